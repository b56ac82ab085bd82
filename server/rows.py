"""Where each request sits in a packed forward pass: the row layout of one plan, built once per step.

The unit of sampling is an *image* (one sampler state, its own σ); the unit of the forward pass is a
*row*. A request of n images occupies n rows, or 2n with classifier-free guidance: per request its n
conditional rows, then its n unconditional rows. So for requests A (2 images, guided) and B (1 image,
unguided) the pass holds rows ``[A0, A1, A0', A1', B0]`` (' = unconditional) from images ``[A0, A1, B0]``.

No torch here: the layout is index lists, turned into one device index tensor by the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class RowSource(Protocol):
    """What the layout needs to know of a request."""

    @property
    def num_images(self) -> int: ...

    @property
    def guided(self) -> bool: ...

    @property
    def guidance_scale(self) -> float: ...

    @property
    def has_control(self) -> bool: ...


@dataclass(frozen=True)
class RowLayout:
    """Index lists of one forward pass (see the module docstring).

    ``row_image[r]``: the image row r samples. ``cond_row[i]`` / ``uncond_row[i]``: image i's conditional
    and unconditional rows (the same row when its request is unguided). ``guidance[i]``: image i's scale
    (1.0 when unguided: the combine then returns its cond row exactly). ``image_bounds[k]:image_bounds[k+1]``
    and ``row_bounds[k]:row_bounds[k+1]``: request k's images and rows. ``control_rows[r]``: whether row r's
    request carries a control map.
    """

    row_image: tuple[int, ...]
    cond_row: tuple[int, ...]
    uncond_row: tuple[int, ...]
    guidance: tuple[float, ...]
    image_bounds: tuple[int, ...]
    row_bounds: tuple[int, ...]
    control_rows: tuple[bool, ...]

    @classmethod
    def build(cls, requests: Sequence[RowSource]) -> RowLayout:
        row_image: list[int] = []
        cond_row: list[int] = []
        uncond_row: list[int] = []
        guidance: list[float] = []
        image_bounds, row_bounds = [0], [0]
        control_rows: list[bool] = []
        for r in requests:
            n, first_image, first_row = r.num_images, image_bounds[-1], len(row_image)
            own = list(range(first_image, first_image + n))
            row_image += own + own if r.guided else own
            cond_row += range(first_row, first_row + n)
            uncond_first = first_row + n if r.guided else first_row
            uncond_row += range(uncond_first, uncond_first + n)
            guidance += [r.guidance_scale if r.guided else 1.0] * n
            image_bounds.append(first_image + n)
            row_bounds.append(len(row_image))
            control_rows += [r.has_control] * (len(row_image) - first_row)
        return cls(
            tuple(row_image),
            tuple(cond_row),
            tuple(uncond_row),
            tuple(guidance),
            tuple(image_bounds),
            tuple(row_bounds),
            tuple(control_rows),
        )

    @property
    def num_rows(self) -> int:
        return len(self.row_image)

    @property
    def num_images(self) -> int:
        return len(self.cond_row)

    @property
    def guided(self) -> bool:
        """Whether any request in the pass carries unconditional rows."""
        return self.num_rows > self.num_images

    @property
    def any_control(self) -> bool:
        return any(self.control_rows)

    @property
    def all_control(self) -> bool:
        return all(self.control_rows)

    def gather_index(self) -> list[int]:
        """One index list for the worker's single device index: rows' images, then cond rows, then uncond
        rows (sliced apart on the device, so the layout costs one host-to-device copy)."""
        return [*self.row_image, *self.cond_row, *self.uncond_row]
