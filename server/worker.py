"""Owns the models and the device: packs rows of many requests into one denoiser call per engine step.

No queueing logic lives here (that is ``scheduler.py``). A request's worker state (``RequestState``) holds
one sampler state per image (image i draws from its own ``RequestNoise(seed + i)``, so an image is the same
whether requested alone or as part of a batch) plus the conditioning rows, built once at ``prepare``.

The row layout of a pass (which request's images sit in which rows, CFG halves) is ``server.rows.RowLayout``,
built once per step. Forward passes are padded to the next batch bucket (repeating the first
row, so padding is always finite input); every bucket runs once at ``warmup``.

On CUDA (unless ``cuda_graphs=False``) each denoiser runs through a ``GraphedDenoiser``
(model/cuda_graphs.py): one CUDA graph per bucket, all captured at ``warmup`` for the model's default size,
with and without control for ControlNet pipelines. A call whose structure was not captured (another image
size) runs eagerly rather than capture on the hot path. Every path pads through a ``GraphedDenoiser``: on CPU
(or for a structure not captured) the same padded call runs eagerly; its byte-exact batch invariance on CPU
relies on bucket-sized GEMMs.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.cuda_graphs import GraphedDenoiser
from model.denoiser import cfg_combine, clamp_x0
from model.img2img import blend, image_start, inpainting_channels, latent_mask, strength_start
from model.noise import RequestNoise
from model.pipeline import Pipeline
from model.sd_controlnet import ControlInput, pack_controls
from server.lora_slots import LoraSlots
from server.request import ResolvedRequest, rows_for
from server.rows import RowLayout

if TYPE_CHECKING:
    from model.samplers import Sampler, SamplerState

log = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 128  # previews are downscaled (area) to at most this many pixels a side
# A batched VAE decode of this many latents at once at most (SD 512²: ~1 GB of fp16 activations per 8).
VAE_DECODE_MAX_ROWS = 8


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), round((x + 1) / 2 · 255) (NaN -> 0)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


@dataclass(eq=False)
class RequestState:
    """Worker-side state of one request: sampler states and its conditioning rows (on the device)."""

    pipeline: Pipeline
    sampler: Sampler
    states: list[SamplerState]  # one sampler state per image
    num_images: int
    guided: bool
    guidance_scale: float
    class_labels: torch.Tensor | None  # (rows,) long
    context: torch.Tensor | None  # (rows, L, D)
    control: torch.Tensor | None  # (rows, 1, H, W) in [0, 1]
    control_scale: float
    evaluations: int = 0  # denoiser calls this request has taken
    preview_every: int = 0  # keep the last x0 estimate for previews (the core asks every k evaluations)
    last_x0: torch.Tensor | None = None  # (n, C, H, W) of the last step, when preview_every > 0
    warnings: list[str] = field(default_factory=list)  # for the response (e.g. a truncated prompt)
    loras: tuple[tuple[tuple[str, str], float], ...] = ()  # ((name, sha256), scale) each (server.lora_slots)
    controls: list[ControlInput] = field(default_factory=list)  # SD ControlNets (model.sd_controlnet)
    x_concat: torch.Tensor | None = None  # (rows, 1 + C, h, w): inpainting U-Net mask + masked latent
    added_cond: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (rows, P), time_ids (rows, 6)
    known: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # blend mode: per image (x0, ε) (1, C, h, w)
    blend_mask: torch.Tensor | None = None  # (1, 1, h, w), 1 = repaint (blend mode)

    @property
    def rows(self) -> int:
        return rows_for(self.num_images, self.guided)

    @property
    def has_control(self) -> bool:
        return self.control is not None or bool(self.controls)


@dataclass(eq=False)
class PendingImages:
    """Final images on their way to host memory; ``ready`` polls without blocking, ``wait`` blocks."""

    pixels: torch.Tensor  # (N, H, W, C) uint8 on the host (pinned on CUDA, filled once `event` completes)
    finite: torch.Tensor  # (N,) bool on the host: the image's values were all finite before conversion
    bounds: list[int]  # request k owns images bounds[k]:bounds[k + 1]
    event: Any = None  # torch.cuda.Event recorded after the copy; None: already on the host

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def wait(self) -> list[np.ndarray | None]:
        """uint8 (n, H, W, C) per request; None for a request with a non-finite (NaN/inf) image."""
        if self.event is not None:
            self.event.synchronize()  # releases the GIL while it waits
        pixels, finite = self.pixels.numpy(), self.finite.numpy()
        spans = zip(self.bounds[:-1], self.bounds[1:], strict=True)
        return [pixels[a:b] if finite[a:b].all() else None for a, b in spans]


class Worker:
    """Runs one packed denoiser forward pass per ``step`` over the rows of many requests."""

    def __init__(
        self,
        pipelines: dict[str, Pipeline],
        buckets: Sequence[int],
        prompt_cache_size: int = 1024,
        cuda_graphs: bool = True,
        max_steps_ahead: int = 1,
        lora_dir: Path | None = None,
    ):
        if not pipelines:
            raise ValueError("no pipelines")
        self.pipelines = pipelines
        self.buckets = sorted(set(int(b) for b in buckets))
        first = next(iter(pipelines.values()))
        self.device = first.device
        # (id(encoder), prompt) -> (context rows (L, D), whether the prompt was truncated), LRU
        # SDXL: also its pooled text embeds (P,), else None
        self._prompt_cache: OrderedDict[tuple[int, str], tuple[torch.Tensor, bool, torch.Tensor | None]] = (
            OrderedDict()
        )
        self._prompt_cache_size = prompt_cache_size
        self.prompt_cache_hits = 0  # prompts found in the cache (counters; the core reports deltas)
        self.prompt_cache_misses = 0
        self.warmed: set[tuple[Hashable, int]] = set()
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # CUDA: steps are launched without waiting for the device; the host may run this many steps ahead
        # of it (enough to overlap one step's host work with the previous step's kernels, while a new or
        # cancelled request still takes effect within a few forward passes).
        self.max_steps_ahead = max_steps_ahead
        self._step_events: deque[Any] = deque()
        self._graphs: dict[int, GraphedDenoiser] = {}  # id(denoiser) -> its runner
        self._eager: dict[int, GraphedDenoiser] = {}  # id(denoiser) -> its runner without graphs
        # (id(denoiser), per-row x shape, with control) of every structure captured for all buckets
        self._captured: set[tuple[int, tuple[int, ...], bool]] = set()
        # A base model with several ControlNets cannot run them all in one call: key those apart.
        per_unet: dict[int, set[int]] = {}
        for p in pipelines.values():
            if p.controlnet is not None:
                per_unet.setdefault(id(p.unet), set()).add(id(p.controlnet))
        self._split_controlnets = {u for u, cns in per_unet.items() if len(cns) > 1}
        # LoRA (server.lora_slots): banks hooked into every U-Net before warm-up; graphs of LoRA passes
        self.loras = LoraSlots.create(pipelines, self.max_rows, lora_dir)
        self._lora_graphs: dict[int, GraphedDenoiser] = {}
        self._lora_captured: set[tuple[int, tuple[int, ...], bool]] = set()
        self.last_lora_rows = 0  # rows of the last step that carried an adapter

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, rows: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, rows)]

    # -- admission ----------------------------------------------------------------------------

    def batch_key(self, req: ResolvedRequest) -> Hashable:
        """Requests with equal keys can share a forward pass: same U-Net instance, shape and dtype."""
        p = self.pipelines[req.model]
        key: tuple[Any, ...] = (id(p.unet), p.image_channels, req.height, req.width, str(p.dtype))
        if req.loras and self.loras is not None:  # admission: start reading its adapter files now
            self.loras.prefetch(p, req)
        if id(p.unet) in self._split_controlnets and req.control is not None:
            key += (id(p.controlnet),)
        return key

    def _encode(
        self, pipeline: Pipeline, prompts: list[str], count_hits: bool = True, encoder: Any = None
    ) -> list[tuple[torch.Tensor, bool, torch.Tensor | None]]:
        """(context rows (L, D), truncated, pooled (P,) for SDXL else None) per prompt, from the cache or one
        batched encoder call.

        ``count_hits=False``: a second lookup of prompts already counted (``prepare`` after
        ``encode_prompts``); only prompts it has to encode itself count, as misses."""
        enc = pipeline.text_encoder if encoder is None else encoder
        missing = sorted({p for p in prompts if (id(enc), p) not in self._prompt_cache})
        self.prompt_cache_misses += len(missing)
        if count_hits:
            self.prompt_cache_hits += len(prompts) - len(missing)
        if missing:
            pooled: list[torch.Tensor | None] = [None] * len(missing)
            if hasattr(enc, "encode_with_info"):  # CLIP: also says which prompts were cut at 77 tokens
                info = enc.encode_with_info(missing)
                states, truncated = info.states.to(self.device), list(info.truncated)  # (M, L, D)
                if getattr(info, "pooled", None) is not None:  # SDXL: (M, P)
                    pooled = list(info.pooled.to(self.device))
            else:
                states, truncated = enc.encode(missing).to(self.device), [False] * len(missing)
            for prompt, row, cut, pool in zip(missing, states, truncated, pooled, strict=True):
                self._prompt_cache[(id(enc), prompt)] = (row, bool(cut), pool)
        out = []
        for p in prompts:
            self._prompt_cache.move_to_end((id(enc), p))
            out.append(self._prompt_cache[(id(enc), p)])
        while len(self._prompt_cache) > self._prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return out

    @staticmethod
    def _prompts(req: ResolvedRequest) -> list[str]:
        """The prompts a text request's rows use: its prompt, then (guided) its negative prompt."""
        return [req.prompt or "", req.negative_prompt or ""] if req.guided else [req.prompt or ""]

    @torch.no_grad()
    def encode_prompts(self, requests: Sequence[ResolvedRequest]) -> None:
        """Encode the prompts of many newly admitted requests in one encoder call per text encoder (they
        land in the cache that ``prepare`` reads)."""
        by_encoder: dict[int, tuple[Pipeline, Any, list[str]]] = {}
        for req in requests:
            p = self.pipelines[req.model]
            if p.kind == "text":
                enc = self._text_encoder(p, req)  # with the request's text-encoder LoRA, if any
                by_encoder.setdefault(id(enc), (p, enc, []))[2].extend(self._prompts(req))
        for p, enc, prompts in by_encoder.values():
            self._encode(p, prompts, encoder=enc)

    @torch.no_grad()
    def prepare(self, req: ResolvedRequest, preview_every: int = 0) -> RequestState:
        """Draw initial noise, build sampler states and conditioning rows for one request."""
        from model.samplers import get_sampler

        p = self.pipelines[req.model]
        n, dev = req.num_images, self.device
        sampler = get_sampler(req.sampler, p.schedule.kind)
        sigmas = sampler.make_sigmas(p.schedule, req.num_inference_steps)
        shape = (1, *p.latent_shape(req.height, req.width))  # (1, C, h, w): pixels, or VAE latents
        states = []
        x_concat = known = blend_mask = None
        if req.image is None:
            for seed in req.seeds:
                noise = RequestNoise(seed)
                states.append(sampler.init(noise.initial(shape, dev), sigmas, generator=noise))
        else:
            states, x_concat, known, blend_mask = self._image_states(p, req, sampler, sigmas)

        class_labels = context = control = added_cond = None
        warnings: list[str] = list(getattr(req, "notes", ()))
        if p.kind == "class":
            null = p.null_class_label
            label = req.class_label if req.class_label is not None else null
            if label is None:
                label = 0  # no null row in this model: an unconditional request samples class 0
            labels = [label] * n + ([null] * n if req.guided else [])
            class_labels = self._to_device(torch.tensor(labels, dtype=torch.long))  # (rows,)
        else:
            enc = self._text_encoder(p, req)
            encoded = self._encode(p, self._prompts(req), False, enc)  # counted by encode_prompts
            context = torch.cat([row.expand(n, *row.shape) for row, *_ in encoded])  # (rows, L, D)
            if p.is_sdxl:  # zero uncond rows as diffusers, and per-row pooled embeds + size/crop ids
                context, added_cond = self._sdxl_rows(p, req, encoded)
            limit = getattr(p.text_encoder, "max_length", None)
            for (_, cut, _), field in zip(encoded, ("prompt", "negative_prompt"), strict=False):
                if cut:
                    warnings.append(f"{field} was truncated to the text encoder's {limit} tokens")
        if req.control is not None:
            cond = self._to_device(torch.from_numpy(np.ascontiguousarray(req.control)))  # (H, W)
            control = cond[None, None].expand(rows_for(n, req.guided), 1, *cond.shape)  # (rows, 1, H, W)
        return RequestState(
            pipeline=p,
            sampler=sampler,
            states=states,
            num_images=n,
            guided=req.guided,
            guidance_scale=req.guidance_scale,
            class_labels=class_labels,
            context=context,
            control=control,
            control_scale=req.control_scale,
            controls=self._controls(req),
            preview_every=preview_every,
            warnings=warnings,
            loras=self._lora_refs(p, req),
            x_concat=x_concat,
            known=known,
            blend_mask=blend_mask,
            added_cond=added_cond,
        )

    @staticmethod
    def _sdxl_rows(
        p: Pipeline, req: ResolvedRequest, encoded: list[tuple[torch.Tensor, bool, torch.Tensor | None]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SDXL rows (model.sdxl): context (rows, L, D) and {"text_embeds": (rows, P), "time_ids": (rows, 6)};
        no negative prompt with force_zeros_for_empty_prompt gives zero uncond rows."""
        from model.sdxl import conditioning_rows, time_ids, zero_uncond

        (c_states, _, c_pooled), *rest = encoded
        assert c_pooled is not None  # an SDXL text encoder returns pooled embeds
        uncond = None
        if req.guided:
            u_states, _, u_pooled = rest[0]
            assert u_pooled is not None
            uncond = (u_states, u_pooled)
        ids = time_ids(req.height, req.width, req.original_size, req.crops_coords_top_left, req.target_size)
        zeros = zero_uncond(req.negative_prompt, p.force_zeros_for_empty_prompt)
        return conditioning_rows((c_states, c_pooled), uncond, ids, req.num_images, zeros)

    def _image_states(
        self, p: Pipeline, req: ResolvedRequest, sampler: Sampler, sigmas: torch.Tensor
    ) -> tuple[list[SamplerState], torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]] | None,
               torch.Tensor | None]:
        """Image-to-image / inpainting starts (model.img2img): per image its sampler state on the grid cut
        at the strength's σ; the inpainting U-Net's extra input rows (rows, 1 + C, h, w), or blend mode's
        known latents per image and mask (1, 1, h, w)."""
        grid = sigmas[strength_start(req.num_inference_steps, req.strength) :].tolist()
        image = self._to_device(torch.from_numpy(np.ascontiguousarray(req.image)))[None]  # (1, C, H, W)
        mask = None
        if req.mask is not None:
            mask = self._to_device(torch.from_numpy(np.ascontiguousarray(req.mask)))[None, None]  # (1,1,H,W)
        inpainting_unet = self._inpainting_channels(p) > 0
        if inpainting_unet and mask is None:
            raise ValueError(f"model {p.name!r} has an inpainting U-Net: it needs a mask")
        states, concats, known = [], [], []
        for seed in req.seeds:
            noise = RequestNoise(seed)
            start = image_start(
                image, mask, noise, grid, p.schedule.kind, p.vae, inpainting_unet, req.strength
            )
            states.append(sampler.init_at(start.x, grid, generator=noise))
            if start.concat is not None:
                concats.append(start.concat)
            elif mask is not None and start.x0 is not None:
                known.append((start.x0, start.noise))
        x_concat = blend_mask = None
        if concats:
            rows = torch.cat(concats)  # (n, 1 + C, h, w): one per image, the same for its uncond row
            x_concat = torch.cat([rows, rows]) if req.guided else rows  # (rows, 1 + C, h, w)
        if known:
            blend_mask = latent_mask(mask, tuple(states[0].x.shape[-2:]))  # type: ignore[arg-type]
        return states, x_concat, known or None, blend_mask

    def _controls(self, req: ResolvedRequest) -> list[ControlInput]:
        """The request's SD ControlNets with their images on the device, (1, C, H, W) in [0, 1]."""
        out = []
        for c in getattr(req, "controlnets", ()):
            image = self._to_device(torch.from_numpy(np.ascontiguousarray(c.image)))  # (H, W, C)
            image = image.permute(2, 0, 1)[None].contiguous()  # (1, C, H, W)
            out.append(ControlInput(c.name, image, c.scale, c.guidance_start, c.guidance_end))
        return out

    # -- one engine step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, requests: Sequence[RequestState]) -> list[bool]:
        """One denoiser forward pass over every row of ``requests`` (same batch key); advance each sampler.

        Reads as gather -> forward -> combine -> advance. Returns per request whether its sampler is done.
        The tensor work does not grow with the number of requests: one gather of every image's sample, one
        index for the row layout, one guidance mix and one clamp for all images, one sampler update per
        sampler configuration; what remains per request/image is host bookkeeping (σ, indices, flags).
        """
        layout = RowLayout.build(requests)
        x, sigma, index = self._gather(requests, layout)  # (B, C, H, W), (B,), (B + 2N,) or None
        x0 = self._forward_lora(requests, layout, x, sigma)  # (B, C, H, W)
        x0 = self._combine(requests, layout, x0, index)  # (N, C, H, W)
        self._advance(requests, layout, x0)
        self._blend(requests)
        for k, r in enumerate(requests):
            r.evaluations += 1
            if r.preview_every:
                # (n, C, H, W): kept for a preview; a view, no copy
                r.last_x0 = x0[layout.image_bounds[k] : layout.image_bounds[k + 1]]
        if self.device.type == "cuda":
            self._bound_run_ahead()
        return [all(r.sampler.done(s) for s in r.states) for r in requests]

    def _gather(
        self, requests: Sequence[RequestState], layout: RowLayout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every image's current sample and σ, laid out as rows (cond rows, then uncond rows, per request)."""
        inputs = [r.sampler.next_input(s) for r in requests for s in r.states]
        images = torch.cat([x for x, _ in inputs]) if len(inputs) > 1 else inputs[0][0]  # (N, C, H, W)
        sigma_img = [float(s) for _, s in inputs]  # (N,)
        sigma = self._to_device(torch.tensor([sigma_img[i] for i in layout.row_image], dtype=torch.float64))
        if not layout.guided:
            return images, sigma, None  # rows are the images
        index = self._to_device(torch.tensor(layout.gather_index(), dtype=torch.long))  # (B + 2N,)
        return images.index_select(0, index[: layout.num_rows]), sigma, index

    def _forward_rows(
        self, requests: Sequence[RequestState], layout: RowLayout, x: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """The denoiser once over all rows, with each row's conditioning (and control where it has one)."""
        head = requests[0].pipeline
        class_labels = torch.cat([r.class_labels for r in requests]) if head.kind == "class" else None  # type: ignore[misc]
        context = torch.cat([r.context for r in requests]) if head.kind == "text" else None  # type: ignore[misc]
        denoiser, control, scale = head.denoiser, None, None
        if layout.any_control and head.control and head.control.get("controlnets"):
            denoiser, control, scale = self._sd_controls(requests, x)
        elif layout.any_control:
            denoiser = next(r for r in requests if r.control is not None).pipeline.denoiser
            zeros = x.new_zeros((1, 1, *x.shape[2:]))
            control = torch.cat(
                [r.control if r.control is not None else zeros.expand(r.rows, -1, -1, -1) for r in requests]
            )  # (B, 1, H, W)
            # Rows without a control map get scale 0: exactly zero residuals (static shapes, no host sync).
            per_row = [r.control_scale if r.has_control else 0.0 for r in requests for _ in range(r.rows)]
            scale = self._to_device(torch.tensor(per_row, dtype=torch.float32))  # (B,)
        x_concat = None
        if requests[0].x_concat is not None:  # an inpainting U-Net: every row of the batch carries them
            x_concat = torch.cat([r.x_concat for r in requests])  # type: ignore[misc]  # (B, 1 + C, h, w)
        added_cond = None
        if head.is_sdxl:  # every row of an SDXL U-Net's batch carries them: (B, P) and (B, 6)
            conds = [r.added_cond for r in requests if r.added_cond is not None]
            added_cond = {k: torch.cat([c[k] for c in conds]) for k in ("text_embeds", "time_ids")}
        return self._forward(
            denoiser, x, sigma, class_labels, context, control, scale, x_concat, added_cond=added_cond
        )

    @staticmethod
    def _sd_controls(
        requests: Sequence[RequestState], x: torch.Tensor
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """SD ControlNets of one pass: the denoiser with the nets any row uses, their images (B, ΣC, H, W)
        and per-row, per-net scales (B, K): 0 for a net a row does not use or outside its guidance window
        (the row's own step of its own grid), so such rows get exactly zero residuals."""
        head = requests[0].pipeline
        multi: Any = head.controlnet  # a MultiControlNet (or its torch.compile wrapper)
        names = sorted({c.name for r in requests for c in r.controls})
        denoiser = multi.denoiser_for(head.denoiser, names)
        rows = []
        for r in requests:
            steps = [(st.i, len(st.sigmas) - 1) for st in r.states]  # per image: its step of its grid
            for i, n in steps * (2 if r.guided else 1):  # cond rows, then uncond rows
                rows.append((r.controls, i, n))
        size = (x.shape[2] * head.vae_scale_factor, x.shape[3] * head.vae_scale_factor)  # pixels
        cond, scale = pack_controls(denoiser.controlnet, rows, size)  # (B, ΣC, H, W), (B, K)
        return denoiser, cond, scale

    def _combine(
        self,
        requests: Sequence[RequestState],
        layout: RowLayout,
        x0: torch.Tensor,
        index: torch.Tensor | None,
    ) -> torch.Tensor:
        """Rows -> images: uncond + g·(cond − uncond) per image (g = 1: exactly its cond row), then the
        schedule's clamp."""
        if index is not None:
            b, n = layout.num_rows, layout.num_images
            g = self._to_device(torch.tensor(layout.guidance, dtype=torch.float32))  # (N,)
            x0 = cfg_combine(x0.index_select(0, index[b : b + n]), x0.index_select(0, index[b + n :]), g)
        sched = requests[0].pipeline.schedule  # one U-Net per batch key, so one schedule
        if sched.clip_sample_range is not None or sched.dynamic_thresholding_ratio is not None:
            x0 = clamp_x0(x0, sched.clip_sample_range, sched.dynamic_thresholding_ratio)  # (N, C, H, W)
        return x0

    def _advance(self, requests: Sequence[RequestState], layout: RowLayout, x0: torch.Tensor) -> None:
        """Samplers of one configuration advance together: one vectorised update per step kind for DDIM,
        Euler and DPM++ 2M (bitwise the per-request loop on CPU), a loop over states for the others."""
        states = [s for r in requests for s in r.states]
        groups: dict[Hashable, tuple[Any, list[int]]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.sampler.batch_key, (r.sampler, []))[1].append(i)
        if len(groups) == 1:
            requests[0].sampler.advance_many(states, x0)
            return
        bounds = layout.image_bounds
        for sampler, members in groups.values():
            picked = [j for i in members for j in range(bounds[i], bounds[i + 1])]
            sel = self._to_device(torch.tensor(picked, dtype=torch.long))
            sampler.advance_many([states[j] for j in picked], x0.index_select(0, sel))

    @staticmethod
    def _blend(requests: Sequence[RequestState]) -> None:
        """Masked latent blending (inpainting with an ordinary U-Net): after each completed step into σ'
        the known region becomes the init latent noised to σ' (model.img2img.blend). Heun's predictor
        stage is not a completed step."""
        for r in requests:
            if r.known is None or r.blend_mask is None:
                continue
            kind = r.pipeline.schedule.kind
            for st, (x0, noise) in zip(r.states, r.known, strict=True):
                if st.stage == 0:
                    st.x = blend(st.x, x0, noise, r.blend_mask, st.sigmas[st.i], kind)

    def _bound_run_ahead(self) -> None:
        """Record this step's end; wait (GIL released) for the step ``max_steps_ahead`` back to finish."""
        event = torch.cuda.Event()
        event.record()
        self._step_events.append(event)
        while len(self._step_events) > self.max_steps_ahead:
            self._step_events.popleft().synchronize()

    def _forward(
        self,
        denoiser: Any,
        x: torch.Tensor,
        sigma: torch.Tensor,
        class_labels: torch.Tensor | None,
        context: torch.Tensor | None,
        control: torch.Tensor | None,
        scale: torch.Tensor | None,
        x_concat: torch.Tensor | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The denoiser on rows padded up to their bucket; returns the real rows (a copy).

        One path on every device: a ``GraphedDenoiser`` pads the rows into its bucket's static buffers and
        replays the bucket's CUDA graph when this structure was captured at warm-up, else runs the same
        padded call eagerly (CPU, or a size not captured). Bucket-sized calls keep a row's result
        independent of the other rows on CPU (byte-exact batch invariance)."""
        runner = self._runner(denoiser, x, control)
        extra: dict[str, Any] = {} if x_concat is None else {"x_concat": x_concat}  # inpainting U-Nets
        if added_cond is not None:  # SDXL: padded into the bucket like every other input
            extra["added_cond"] = added_cond
        return runner(
            x, sigma, class_labels=class_labels, context=context, control_cond=control, control_scale=scale,
            **extra,
        )

    # -- CUDA graphs ----------------------------------------------------------------------------

    def _runner(self, denoiser: Any, x: torch.Tensor, control: torch.Tensor | None) -> GraphedDenoiser:
        """The denoiser's graph runner if this input structure was captured at warm-up, else its eager
        runner (same padding, no graphs: never a capture on the hot path)."""
        if (id(denoiser), tuple(x.shape[1:]), control is not None) in self._captured:
            return self._graphs[id(denoiser)]
        runner = self._eager.get(id(denoiser))
        if runner is None:
            runner = GraphedDenoiser(denoiser, self.buckets, device=self.device, use_graphs=False)
            self._eager[id(denoiser)] = runner
        return runner

    def _capture(self, denoiser: Any, **example: Any) -> None:
        """Capture a graph per bucket for the structure of ``example`` (x fp32, sigma float64, max rows)."""
        key = (id(denoiser), tuple(example["x"].shape[1:]), example.get("control_cond") is not None)
        if key in self._captured:
            return
        runner = self._graphs.get(id(denoiser))
        if runner is None:
            runner = self._graphs[id(denoiser)] = GraphedDenoiser(denoiser, self.buckets, device=self.device)
        runner.warmup(**example)
        self._captured.add(key)

    def captured_graphs(self) -> dict[int, list[int]]:
        """Bucket sizes with a captured CUDA graph, per denoiser (empty on CPU or with graphs off)."""
        return {k: r.captured() for k, r in self._graphs.items()}

    # -- results and warm-up ------------------------------------------------------------------

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device; on CUDA through pinned memory, without blocking the host."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    @torch.no_grad()
    def read_images(self, requests: Sequence[RequestState]) -> PendingImages:
        """Start reading back the final images of ``requests`` (one image shape, e.g. those finishing in
        one step): converted to uint8 round((x + 1) / 2 * 255) on the device and copied to pinned host
        memory in one copy that does not block the host; ``PendingImages.wait`` returns them. A per-image
        finiteness flag travels with them (computed on the device: no host sync in the step), so a NaN
        never becomes a black PNG."""
        x = self._decode([r.sampler.result(s) for r in requests for s in r.states], requests[0].pipeline)
        finite = torch.isfinite(x).flatten(1).all(1)  # (N,)
        pixels = to_uint8(x)  # (N, H, W, C)
        bounds = np.cumsum([0] + [r.num_images for r in requests]).tolist()
        if self.device.type != "cuda":
            return PendingImages(pixels.contiguous(), finite, bounds, None)
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        host_finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
        host_finite.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingImages(host, host_finite, bounds, event)

    def _decode(self, samples: list[torch.Tensor], p: Pipeline) -> torch.Tensor:
        """Final samples -> images in model pixel space [-1, 1] (N, C, H, W) fp32: pixel models as they are,
        latent models through the VAE in one batched call (sliced to bound activation memory)."""
        x = torch.cat(samples) if len(samples) > 1 else samples[0]  # (N, C, h, w)
        if p.vae is None:
            return x.float()
        # CPU: one image per call, so an image's bytes do not depend on which others finished with it (CPU
        # conv kernels pick their blocking by batch size); CUDA: batched, equal within float tolerance.
        max_rows = VAE_DECODE_MAX_ROWS if self.device.type == "cuda" else 1
        return p.vae.decode_sliced(x, max_rows).float()  # (N, 3, h·f, w·f)

    def images(self, requests: Sequence[RequestState]) -> list[np.ndarray | None]:
        """Final images per request as uint8 (n, H, W, C), read back now (``read_images`` + ``wait``)."""
        return self.read_images(requests).wait()

    @torch.no_grad()
    def preview(self, request: RequestState, max_side: int = PREVIEW_MAX_SIDE) -> np.ndarray | None:
        """A small uint8 (n, h, w, C) picture of the request's last x0 estimate, or None before its first
        step. Synchronises with the device: only for requests that asked for previews, every k steps."""
        if request.last_x0 is None:
            return None
        x0 = self._decode([request.last_x0], request.pipeline).nan_to_num(0.0)  # (n, C, H, W)
        side = max(x0.shape[-2:])
        if side > max_side:
            x0 = torch.nn.functional.interpolate(x0, scale_factor=max_side / side, mode="area")
        return to_uint8(x0).cpu().numpy()

    def total_evaluations(self, state: RequestState, num_inference_steps: int) -> int:
        """Denoiser calls a request takes (sampler-specific, e.g. Heun: 2 per step but the last)."""
        steps = len(state.states[0].sigmas) - 1 if state.states else num_inference_steps  # img2img: fewer
        count = getattr(state.sampler, "num_evaluations", None)
        return int(count(steps)) if callable(count) else steps

    def _example(self, p: Pipeline, rows: int) -> dict[str, Any]:
        """Denoiser inputs of ``rows`` rows at the pipeline's default size (with control if it has one)."""
        d, dev = p.defaults, self.device
        example: dict[str, Any] = {
            "x": torch.zeros(rows, *p.latent_shape(d.height, d.width), device=dev),  # fp32, as in step
            "sigma": torch.full((rows,), float(p.schedule.sigma_max), dtype=torch.float64, device=dev),
            "class_labels": None,
            "context": None,
            "control_cond": None,
            "control_scale": None,
        }
        if p.kind == "class":
            label = p.null_class_label or 0
            example["class_labels"] = torch.full((rows,), label, dtype=torch.long, device=dev)
        else:
            example["context"] = self._encode(p, [""])[0][0].expand(rows, -1, -1)  # (rows, L, D)
        if p.is_sdxl:
            from model.sdxl import time_ids

            pooled = self._encode(p, [""])[0][2]
            assert pooled is not None
            ids = torch.tensor([time_ids(d.height, d.width)], dtype=torch.float32, device=dev)  # (1, 6)
            example["added_cond"] = {"text_embeds": pooled.expand(rows, -1), "time_ids": ids.expand(rows, -1)}
        if p.control and p.control.get("controlnets"):  # SD: every net of the model, (rows, ΣC, H, W)
            channels = getattr(p.controlnet, "channels", (1,))
            example["control_cond"] = torch.zeros(rows, sum(channels), d.height, d.width, device=dev)
            example["control_scale"] = torch.ones(rows, len(channels), device=dev)
        elif p.controlnet is not None:
            example["control_cond"] = torch.zeros(rows, 1, d.height, d.width, device=dev)
            example["control_scale"] = torch.ones(rows, device=dev)
        extra = self._inpainting_channels(p)
        if extra:  # an inpainting U-Net: mask + masked-image latent channels on every row
            _, h, w = p.latent_shape(d.height, d.width)
            example["x_concat"] = torch.zeros(rows, extra, h, w, device=dev)
        return example

    @staticmethod
    def _inpainting_channels(p: Pipeline) -> int:
        """Extra U-Net input channels of an inpainting U-Net (0 for an ordinary one)."""
        if p.vae is None:
            return 0
        return inpainting_channels(p.unet.config.in_channels or 0, p.latent_channels or 0)

    @torch.no_grad()
    def warmup(self) -> None:
        """Run every batch bucket once for each distinct denoiser configuration at its default size.

        With CUDA graphs: capture every bucket per denoiser instead, with and without control for a
        ControlNet pipeline (a batch whose rows carry no control map runs its denoiser without control).
        """
        for p in self.pipelines.values():
            d = p.defaults
            key = (id(p.unet), id(p.controlnet), d.height, d.width)
            if self.cuda_graphs:
                example = self._example(p, self.max_rows)
                self._capture(p.denoiser, **example)
                if p.controlnet is not None:
                    self._capture(p.denoiser, **{**example, "control_cond": None, "control_scale": None})
                self.warmed.update((key, b) for b in self.buckets)
                continue
            for b in self.buckets:
                if (key, b) in self.warmed:
                    continue
                e = self._example(p, b)
                self._forward(
                    p.denoiser,
                    e["x"],
                    e["sigma"],
                    e["class_labels"],
                    e["context"],
                    e["control_cond"],
                    e["control_scale"],
                    e.get("x_concat"),
                    added_cond=e.get("added_cond"),
                )
                self.warmed.add((key, b))
        self._warmup_lora()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info(
            "warmed %d (model, bucket) pairs; buckets %s; CUDA graphs %s",
            len(self.warmed),
            self.buckets,
            "on" if self.cuda_graphs else "off",
        )

    # -- LoRA (server.lora_slots; model.lora_batched) ----------------------------------------------

    def _lora_refs(self, p: Pipeline, req: ResolvedRequest) -> tuple[tuple[tuple[str, str], float], ...]:
        """The request's adapters, each read and checked against its model (LoraError says why not)."""
        if not req.loras:
            return ()
        if self.loras is None:
            from model.lora import LoraError

            raise LoraError("LoRA adapters are disabled on this server (UNET_SERVER_LORA_ENABLED=false)")
        return self.loras.resolve(p, req)

    def _text_encoder(self, p: Pipeline, req: ResolvedRequest) -> Any:
        """The encoder of the request's prompts: its model's, or one applying its text-encoder adapters
        (its own identity, hence its own prompt-cache entries)."""
        if not req.loras or self.loras is None:
            return p.text_encoder
        return self.loras.text_encoder(p, req)

    def _forward_lora(
        self, requests: Sequence[RequestState], layout: RowLayout, x: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """``_forward_rows`` with each row's adapters: the rows' page indices and scales go into the bank's
        persistent buffers, then the pass runs inside ``bank.rows()`` (on CUDA: the graph captured there).
        Without adapters in the pass: the plain path. Adapters needing more device pages than there are:
        consecutive groups of requests, one pass each (each padded to its bucket, as any pass)."""
        self.last_lora_rows = 0  # rows of this step that carry an adapter (the core's per-pass metric)
        if self.loras is None:
            return self._forward_rows(requests, layout, x, sigma)
        parts = []
        for i, j in self.loras.segments(requests):
            sub = requests[i:j]
            a, b = layout.row_bounds[i], layout.row_bounds[j]
            sub_layout = layout if (i, j) == (0, len(requests)) else RowLayout.build(sub)
            bs = self.loras.begin(sub)
            self.last_lora_rows += sum(r.rows for r in sub if r.loras)
            if bs is None:
                parts.append(self._forward_rows(sub, sub_layout, x[a:b], sigma[a:b]))
                continue
            graphs, captured = self._graphs, self._captured
            self._graphs, self._captured = self._lora_graphs, self._lora_captured  # graphs captured with LoRA
            try:
                with bs.bank.rows():
                    parts.append(self._forward_rows(sub, sub_layout, x[a:b], sigma[a:b]))
            finally:
                self._graphs, self._captured = graphs, captured
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # (B, C, H, W)

    def _warmup_lora(self) -> None:
        """CUDA graphs: capture every bucket once more inside ``bank.rows()`` (zero pages: base results),
        so that passes with adapters replay graphs too."""
        if self.loras is None or not self.cuda_graphs:
            return
        graphs, captured = self._graphs, self._captured
        self._graphs, self._captured = self._lora_graphs, self._lora_captured
        try:
            for p in self.pipelines.values():
                bs = self.loras.bank_for(p)
                example = self._example(p, self.max_rows)
                with bs.bank.rows():
                    self._capture(p.denoiser, **example)
        finally:
            self._graphs, self._captured = graphs, captured

    def lora_stats(self) -> Any:
        """``server.lora_slots.LoraStats`` now (None without LoRA): resident adapters, loads, evictions,
        rows carrying adapters — for the core to report."""
        return None if self.loras is None else self.loras.snapshot()
