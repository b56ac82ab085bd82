"""Per-request seeded noise: the initial noise and every SDE draw of one request come from its own generator.

Draws happen in fp32 on the CPU and are then moved to the target device, so a seed gives the same image on
CPU and GPU and whatever other requests share the batch (or the order their rows were packed in).
"""

from __future__ import annotations

import torch

from model.seeds import MAX_SEED, random_seed

__all__ = ["MAX_SEED", "RequestNoise", "draw_step_noise", "random_seed"]

Shape = tuple[int, ...] | torch.Size


class RequestNoise:
    """One request's random stream. `seed=None` picks a random seed, recorded in `.seed` to report back.

    `initial(shape)` and `step(shape)` draw from the same CPU torch.Generator, in call order, so a request's
    sampling is reproducible given its seed, sampler and grid.
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            seed = random_seed()
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def initial(self, shape: Shape, device: torch.device | str | None = None) -> torch.Tensor:
        """Unit Gaussian initial noise (fp32), drawn on the CPU, returned on `device`."""
        return self._draw(shape, device)

    def step(self, shape: Shape, device: torch.device | str | None = None) -> torch.Tensor:
        """Unit Gaussian noise for one SDE step (fp32), drawn on the CPU, returned on `device`."""
        return self._draw(shape, device)

    def _draw(self, shape: Shape, device: torch.device | str | None) -> torch.Tensor:
        device = torch.device(device) if device is not None else torch.device("cpu")
        cuda = device.type == "cuda"
        # On CUDA, draw into pinned memory so the copy is asynchronous: no host sync inside an engine step.
        # Same generator, same kernel: the values do not depend on where the host buffer lives.
        z = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32, pin_memory=cuda)
        return z if device.type == "cpu" else z.to(device, non_blocking=cuda)

    def __repr__(self) -> str:
        return f"RequestNoise(seed={self.seed})"


def draw_step_noise(
    generator: RequestNoise | torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    """Noise shaped like `like` (fp32, on its device) from a RequestNoise or a torch.Generator."""
    if isinstance(generator, RequestNoise):
        return generator.step(like.shape, like.device)
    if isinstance(generator, torch.Generator):
        z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return z.to(like.device)
    raise ValueError("a stochastic sampler needs a generator (RequestNoise or torch.Generator) in its state")
