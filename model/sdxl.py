"""SDXL's per-row added conditioning: size/crop time ids and pooled text embeds (diffusers' rules).

An SDXL U-Net (addition_embed_type "text_time") adds to its time embedding an MLP of [pooled text embeds,
sinusoids of six time ids]: (original_size, crops_coords_top_left, target_size), each (height, width) /
(top, left) in pixels (Podell et al. 2023, "SDXL", section 2.2). `StableDiffusionXLPipeline` defaults:
original_size = target_size = (height, width) of the image asked for, crop (0, 0); the unconditional rows
use the same time ids. With the folder's `force_zeros_for_empty_prompt` (SDXL base: true) a request
without a negative prompt has all-zero unconditional context and pooled embeds; an explicit negative
prompt (even "") is encoded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)

__all__ = ["TIME_IDS", "check_added_width", "conditioning_rows", "time_ids", "zero_uncond"]


def time_ids(
    height: int,
    width: int,
    original_size: Sequence[int] | None = None,
    crops_coords_top_left: Sequence[int] | None = None,
    target_size: Sequence[int] | None = None,
) -> list[float]:
    """The six time ids of one image, diffusers' defaults filled in: original = target = (height, width),
    crop (0, 0)."""
    original = tuple(original_size) if original_size is not None else (height, width)
    crop = tuple(crops_coords_top_left) if crops_coords_top_left is not None else (0, 0)
    target = tuple(target_size) if target_size is not None else (height, width)
    return [float(v) for v in (*original, *crop, *target)]


def check_added_width(projection_input_dim: int, addition_time_embed_dim: int, pooled_size: int) -> None:
    """Raise ValueError unless pooled text (P) + 6 sinusoids fill add_embedding's input, as diffusers checks
    in `_get_add_time_ids` (a refiner's 5 ids + aesthetic score do not)."""
    passed = addition_time_embed_dim * TIME_IDS + pooled_size
    if passed != projection_input_dim:
        raise ValueError(
            f"the U-Net's add_embedding takes {projection_input_dim} inputs but {TIME_IDS} time ids x "
            f"{addition_time_embed_dim} + pooled text embeds ({pooled_size}) make {passed}"
        )


def zero_uncond(negative_prompt: str | None, force_zeros_for_empty_prompt: bool) -> bool:
    """Whether the unconditional rows are zeros instead of the encoded negative prompt (diffusers:
    `negative_prompt is None and force_zeros_for_empty_prompt`)."""
    return negative_prompt is None and force_zeros_for_empty_prompt


def conditioning_rows(
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor] | None,
    ids: Sequence[float],
    num_images: int,
    zeros: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Context and added conditioning of a request's rows: its images' cond rows, then (guided) their
    uncond rows.

    cond / uncond: (states (L, D), pooled (P,)) of the prompt / negative prompt (uncond None: unguided).
    zeros: the uncond rows are zeros (see `zero_uncond`). Returns context (rows, L, D) and
    {"text_embeds": (rows, P), "time_ids": (rows, 6) fp32}.
    """
    states, pooled = cond
    ctx = [states.expand(num_images, *states.shape)]  # (n, L, D)
    emb = [pooled.expand(num_images, *pooled.shape)]  # (n, P)
    if uncond is not None:
        u_states, u_pooled = uncond
        if zeros:
            u_states, u_pooled = torch.zeros_like(states), torch.zeros_like(pooled)
        ctx.append(u_states.expand(num_images, *u_states.shape))
        emb.append(u_pooled.expand(num_images, *u_pooled.shape))
    context = torch.cat(ctx)  # (rows, L, D)
    text_embeds = torch.cat(emb)  # (rows, P)
    row_ids = torch.tensor([list(ids)], dtype=torch.float32, device=states.device)  # (1, 6)
    return context, {"text_embeds": text_embeds, "time_ids": row_ids.expand(context.shape[0], -1)}
