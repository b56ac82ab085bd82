"""ODE and SDE samplers as per-request state machines over per-row noise levels σ.

A server packs rows of many requests — each at its own σ, with its own sampler — into one denoiser call:

    sampler = get_sampler("dpmpp_2m", schedule.kind)            # or "DPM++ 2M Karras", "DDIMScheduler", …
    sigmas = sampler.make_sigmas(schedule, num_inference_steps)  # CPU float64 (steps + 1,), ends in 0
    state = sampler.init(noise.initial(shape), sigmas, noise)    # noise: the request's RequestNoise
    while not sampler.done(state):
        x, sigma = sampler.next_input(state)                     # gather (x, σ) rows of many requests
        denoised = ...                                           # one packed Denoiser call (+ cfg_combine)
        state = sampler.advance(state, denoised)                 # scatter back; state is updated in place
    image = sampler.result(state)

Spaces: both model kinds integrate dx/dσ = (x − x0)/σ in their own σ (see model.schedules). Samplers that
renoise or use exponential integrators also need the signal coefficient α(σ) of x = α·x0 + σ·ε: α = 1 for VP
(VE form) and α = 1 − σ for flow. They are written once, for general α, through the equivalent VE level
s = σ/α (the step from s to s' is computed in ratios so that α = 0 at flow σ = 1 needs no special case).

History (DPM++ 2M), Heun's pending correction and the request's generator live in the `SamplerState`;
σ values are Python floats, so `advance` does a few fused tensor ops and no host syncs.

`advance_many(states, denoised)` advances many states (of many requests) of one sampler configuration at
once: DDIM, Euler and DPM++ 2M update all rows of a step kind with one set of tensor ops and per-row
coefficients. Their updates use only elementwise mul/add/sub/div (no lerp or FMA-fused kernels), whose
results do not depend on a row's position in the batch, so this is bitwise equal to `advance` per state
on CPU. The others loop over `advance`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from model.noise import RequestNoise, draw_step_noise
from model.schedules import Schedule, initial_noise_scale, make_sigmas

Tensor = torch.Tensor
MODEL_KINDS = ("vp", "flow")


@dataclass(eq=False, slots=True)
class SamplerState:
    """One request's sampling progress. `advance` mutates it in place (and returns it)."""

    x: Tensor  # current sample, fp32, sampler space (VE form for VP models)
    sigmas: list[float]  # grid, strictly decreasing
    generator: RequestNoise | torch.Generator | None = None
    i: int = 0  # current interval sigmas[i] → sigmas[i + 1]
    stage: int = 0  # Heun: 1 while the correction evaluation at sigmas[i + 1] is pending
    x_start: Tensor | None = None  # Heun: x at the start of the step
    d: Tensor | None = None  # Heun: derivative at the start of the step
    old_denoised: Tensor | None = None  # DPM++ 2M: previous x0 estimate; Heun: x0 at the step's start
    h_last: float | None = None  # DPM++ 2M: previous step length in log-SNR


class Sampler:
    """Base class. Subclasses implement `step`; everything else is shared."""

    name: ClassVar[str]
    kind: ClassVar[str] = "ode"  # "ode" or "sde"
    model_kinds: ClassVar[tuple[str, ...]] = MODEL_KINDS
    default_spacing: ClassVar[str | None] = None  # None: the schedule's timestep_spacing
    evaluations_per_step: ClassVar[int] = 1
    description: ClassVar[str] = ""

    def __init__(self, model_kind: str | None = None, spacing: str | None = None, eta: float | None = None):
        if model_kind is None and len(self.model_kinds) == 1:
            model_kind = self.model_kinds[0]
        if model_kind is not None and model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}")
        if model_kind is not None and model_kind not in self.model_kinds:
            raise ValueError(
                f"sampler {self.name!r} does not support {model_kind} models "
                f"(it supports: {', '.join(self.model_kinds)})"
            )
        if eta is not None and self.kind != "sde":
            raise ValueError(f"sampler {self.name!r} is deterministic and takes no eta")
        if eta is not None and not 0.0 <= eta <= 10.0:
            raise ValueError(f"eta must be in [0, 10], got {eta}")
        self.model_kind = model_kind
        self.spacing = spacing if spacing is not None else self.default_spacing
        self.eta = 1.0 if eta is None else float(eta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_kind={self.model_kind!r}, spacing={self.spacing!r})"

    # -- grid --------------------------------------------------------------------------------------------

    def make_sigmas(
        self,
        schedule: Schedule,
        num_inference_steps: int,
        spacing: str | None = None,
        *,
        max_steps: int | None = None,
    ) -> Tensor:
        """Grid (steps + 1,) for this sampler: spacing = argument, else the sampler's, else the schedule's."""
        if self.model_kind is not None and schedule.kind != self.model_kind:
            raise ValueError(f"sampler bound to {self.model_kind} models got a {schedule.kind} schedule")
        if schedule.kind not in self.model_kinds:
            raise ValueError(f"sampler {self.name!r} does not support {schedule.kind} models")
        spacing = spacing if spacing is not None else self.spacing
        return make_sigmas(schedule, num_inference_steps, spacing, max_steps=max_steps)

    def num_evaluations(self, num_inference_steps: int) -> int:
        """Denoiser evaluations for a grid of that many steps (Heun skips its correction on the last step)."""
        return num_inference_steps * self.evaluations_per_step - (self.evaluations_per_step - 1)

    # -- state machine -----------------------------------------------------------------------------------

    def init(
        self,
        noise: Tensor,
        sigmas: Tensor | Sequence[float],
        generator: RequestNoise | torch.Generator | None = None,
    ) -> SamplerState:
        """Start a request from unit Gaussian noise (any shape, e.g. (N, C, H, W)) on a decreasing grid.

        The noise is scaled to the first σ: ×sqrt(1 + σ0²) for VP (reproduces diffusers' x_T = noise), ×1 for
        flow. Stochastic samplers draw from `generator`; None gives them a fresh RequestNoise (random seed).
        """
        grid = self._grid(sigmas)
        assert self.model_kind is not None  # checked by _grid
        return self.init_at(noise.float() * initial_noise_scale(self.model_kind, grid[0]), grid, generator)

    def init_at(
        self,
        x: Tensor,
        sigmas: Tensor | Sequence[float],
        generator: RequestNoise | torch.Generator | None = None,
    ) -> SamplerState:
        """Start a request from a sample already at the grid's first σ (sampler space): image-to-image's
        x = α(σ0)·x0 + σ0·ε on a grid cut at the strength's σ (model.img2img)."""
        grid = self._grid(sigmas)
        if self.kind == "sde" and generator is None:
            generator = RequestNoise()
        return SamplerState(x=x.float(), sigmas=grid, generator=generator)

    def _grid(self, sigmas: Tensor | Sequence[float]) -> list[float]:
        """The grid as floats, checked (bound model kind, decreasing, flow within [0, 1])."""
        if self.model_kind is None:
            raise ValueError(
                f"sampler {self.name!r} supports {' and '.join(self.model_kinds)} models: "
                "bind it with get_sampler(name, model_kind=schedule.kind)"
            )
        grid = sigmas.tolist() if torch.is_tensor(sigmas) else [float(s) for s in sigmas]
        if len(grid) < 2:
            raise ValueError("a sigma grid needs at least 2 entries (one step)")
        if any(b >= a for a, b in zip(grid, grid[1:], strict=False)) or grid[-1] < 0:
            raise ValueError("sigmas must be strictly decreasing and non-negative")
        if self.model_kind == "flow" and grid[0] > 1.0:
            raise ValueError(f"flow grids live in [0, 1], got sigma {grid[0]}")
        return grid

    def next_input(self, state: SamplerState) -> tuple[Tensor, float]:
        """(x, σ) for the next denoiser evaluation of this request."""
        return state.x, state.sigmas[state.i + state.stage]

    def advance(self, state: SamplerState, denoised: Tensor) -> SamplerState:
        """Consume the x0 estimate for `next_input(state)` (fp32, same shape as x); returns the state.

        Multistep samplers keep a reference to `denoised` as history: don't write into it afterwards (a
        CUDA-graph output buffer must be cloned first).
        """
        self.step(state, denoised.float())
        return state

    @property
    def batch_key(self) -> Hashable:
        """Samplers with equal keys compute identical updates: their states can share `advance_many`."""
        return (type(self), self.model_kind, self.eta)

    def advance_many(self, states: Sequence[SamplerState], denoised: Tensor) -> None:
        """`advance(states[i], denoised[i : i + 1])` for every i; denoised (N, C, H, W) fp32, one row each.

        Rows are grouped by `_step_kind`; a group of 2+ rows takes one vectorised `_step_many`.
        """
        groups: dict[Hashable, list[int]] = {}
        for i, st in enumerate(states):
            kind = self._step_kind(st)
            if kind is None:
                self.advance(st, denoised[i : i + 1])
            else:
                groups.setdefault(kind, []).append(i)
        for kind, rows in groups.items():
            if len(rows) == 1:
                self.advance(states[rows[0]], denoised[rows[0] : rows[0] + 1])
            else:
                # slices and cat, not denoised[rows]: a list index is a blocking host-to-device copy on CUDA
                picked = denoised
                if len(rows) < len(states):
                    picked = torch.cat([denoised[i : i + 1] for i in rows])  # (len(rows), C, H, W)
                self._step_many(kind, [states[i] for i in rows], picked.float())

    def _step_kind(self, st: SamplerState) -> Hashable | None:
        """Which vectorised update `st`'s next step takes; None: only `step` (per state)."""
        return None

    def _step_many(self, kind: Hashable, states: list[SamplerState], denoised: Tensor) -> None:
        raise NotImplementedError

    @staticmethod
    def done(state: SamplerState) -> bool:
        return state.i >= len(state.sigmas) - 1

    @staticmethod
    def result(state: SamplerState) -> Tensor:
        """The sample (data space when the grid ends in 0, as every `make_sigmas` grid does)."""
        return state.x

    def step(self, st: SamplerState, denoised: Tensor) -> None:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------------

    def _alpha(self, sigma: float) -> float:
        return 1.0 - sigma if self.model_kind == "flow" else 1.0

    def _ratio(self, sigma: float, sigma_next: float) -> float:
        """e^(−h) = s'/s for the VE levels s = σ/α; 0 when σ' = 0 or α(σ) = 0 (flow σ = 1)."""
        a, a_next = self._alpha(sigma), self._alpha(sigma_next)
        return sigma_next * a / (sigma * a_next) if sigma_next > 0 else 0.0


def _per_row(values: list[float], like: Tensor) -> Tensor:
    """Per-row coefficients (N,) → (N, 1, 1, 1) fp32 on `like`'s device (rounded to fp32 exactly as a Python
    float operand is); on CUDA copied from pinned memory without a host sync."""
    cuda = like.device.type == "cuda"
    t = torch.tensor(values, dtype=torch.float32, pin_memory=cuda)
    return t.to(like.device, non_blocking=cuda).reshape(-1, *([1] * (like.ndim - 1)))


def _stack(states: list[SamplerState]) -> Tensor:
    return torch.cat([st.x for st in states])  # (N, C, H, W)


T = TypeVar("T")


def _held(value: T | None) -> T:
    """A state field the step kind guarantees is set (DPM++ 2M's previous x0 on a second-order step)."""
    assert value is not None
    return value


# ---- deterministic (ODE) samplers -------------------------------------------------------------------------


class DDIM(Sampler):
    """DDIM, η = 0 (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12): x' = x0 + σ'·ε̂.

    Written as x' = x0 + (σ'/σ)(x − x0), which is the same update in VE and in flow space.
    """

    name = "ddim"
    description = "DDIM (η=0), first-order deterministic; equals Euler on the probability-flow ODE"

    def step(self, st: SamplerState, denoised: Tensor) -> None:
        sigma, sigma_next = st.sigmas[st.i], st.sigmas[st.i + 1]
        st.x = denoised + (st.x - denoised) * (sigma_next / sigma)
        st.i += 1

    def _step_kind(self, st: SamplerState) -> Hashable | None:
        return "ddim"

    def _step_many(self, kind: Hashable, states: list[SamplerState], denoised: Tensor) -> None:
        x = _stack(states)
        ratio = _per_row([st.sigmas[st.i + 1] / st.sigmas[st.i] for st in states], x)
        x = denoised + (x - denoised) * ratio  # (N, C, H, W), as `step` per row
        for st, row in zip(states, x.split(1), strict=True):
            st.x = row
            st.i += 1


class Euler(Sampler):
    """Euler method on dx/dσ = (x − x0)/σ (Karras et al. 2022, "Elucidating…", Algorithm 2, S_churn = 0)."""

    name = "euler"
    description = "Euler on the probability-flow ODE, first order (k-diffusion sample_euler)"

    def step(self, st: SamplerState, denoised: Tensor) -> None:
        sigma, sigma_next = st.sigmas[st.i], st.sigmas[st.i + 1]
        d = (st.x - denoised) / sigma
        st.x = st.x + d * (sigma_next - sigma)
        st.i += 1

    def _step_kind(self, st: SamplerState) -> Hashable | None:
        return "euler"

    def _step_many(self, kind: Hashable, states: list[SamplerState], denoised: Tensor) -> None:
        x = _stack(states)
        sigma = _per_row([st.sigmas[st.i] for st in states], x)
        dt = _per_row([st.sigmas[st.i + 1] - st.sigmas[st.i] for st in states], x)
        x = x + (x - denoised) / sigma * dt  # (N, C, H, W), as `step` per row
        for st, row in zip(states, x.split(1), strict=True):
            st.x = row
            st.i += 1


class Heun(Sampler):
    """Heun's 2nd-order method (Karras et al. 2022, "Elucidating…", Algorithm 1, S_churn = 0).

    Two evaluations per step (σ, then σ'); the step into σ' = 0 is plain Euler. With the two x0 estimates D
    (at σ) and D' (at σ', from the Euler predictor), the trapezoid in σ is
    x' = q·x + (1 − q)·[D + (σ/2σ')·(D' − D)], q = σ'/σ: once σ/σ' > 2 its x0 estimate extrapolates past D',
    and D′'s error is multiplied by (σ/σ' − 1)/2. On a VP cosine schedule's first trailing step (σ 20,291 →
    6.4) that is ×1,600 and the image is pure noise (diffusers' HeunDiscreteScheduler does the same). A step
    with σ/σ' > `max_sigma_ratio` therefore spends its two evaluations on the exponential trapezoid instead
    (Lu et al. 2022, "DPM-Solver++…", §3: D linear in the log-SNR λ = −log s, integrated exactly):
    x' = (σ'/σ)·x + α'(1 − e^(−h))·D + α'·φ(h)·(D' − D), φ(h) = 1 − (1 − e^(−h))/h ∈ [0, 1), after the
    exponential Euler (DDIM) predictor: second order as well, and no coefficient above 1. Other steps are
    Karras' σ-space update, unchanged (diffusers parity).
    """

    name = "heun"
    evaluations_per_step = 2
    description = "Heun's method, second order, 2 evaluations per step (last step 1)"
    # Where the σ-space corrector starts to extrapolate. Measured on fashion-class (distance to a converged
    # image, /255, trailing 10/20 steps): ∞ (old) 170/168, 3: 2.3/1.7, 2: 2.0/1.2; Karras 10: 92 → 6.2.
    max_sigma_ratio: ClassVar[float] = 2.0

    def _exponential(self, sigma: float, sigma_next: float) -> bool:
        return sigma_next > 0 and sigma > self.max_sigma_ratio * sigma_next

    def step(self, st: SamplerState, denoised: Tensor) -> None:
        sigma, sigma_next = st.sigmas[st.i], st.sigmas[st.i + 1]
        dt = sigma_next - sigma
        if st.stage == 0:
            if self._exponential(sigma, sigma_next):
                q = self._ratio(sigma, sigma_next)  # e^(−h)
                st.x_start, st.old_denoised, st.stage = st.x, denoised, 1
                st.x = st.x * (sigma_next / sigma) + denoised * (self._alpha(sigma_next) * (1 - q))
                return
            d = (st.x - denoised) / sigma
            if sigma_next == 0:
                st.x = st.x + d * dt
                st.i += 1
                return
            st.x_start, st.d, st.stage = st.x, d, 1
            st.x = st.x + d * dt
            return
        if self._exponential(sigma, sigma_next):
            q = self._ratio(sigma, sigma_next)  # e^(−h); 0 from flow σ = 1 (h = ∞, φ = 1)
            phi = 1.0 - (1.0 - q) / -math.log(q) if q > 0 else 1.0
            a = self._alpha(sigma_next)
            start, first = _held(st.x_start), _held(st.old_denoised)  # stored by the predictor (stage 0)
            st.x = start * (sigma_next / sigma) + first * (a * (1 - q)) + (denoised - first) * (a * phi)
        else:
            d_next = (st.x - denoised) / sigma_next
            st.x = _held(st.x_start) + (_held(st.d) + d_next) * (0.5 * dt)
        st.x_start = st.d = st.old_denoised = None
        st.stage = 0
        st.i += 1


class DPMPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++…", Algorithm 2), data prediction, midpoint form.

    x' = (σ'/σ)·x + α'(1 − e^(−h))·D with h the log-SNR step and D = x0 + (x0 − x0_prev)/(2r), r = h_prev/h;
    first order on the first step and into σ' = 0 (diffusers' lower_order_final, k-diffusion's
    sample_dpmpp_2m), and on a step longer than h = log(max_step_ratio): D extrapolates the x0 estimate
    linearly in λ over the step, and over a long one (a Karras grid's last steps on a VP cosine schedule,
    σ 6.1 → 0.44 → 0.0064; FlowMatch's last σ) it overshoots.
    """

    name = "dpmpp_2m"
    # Trailing grids keep consecutive log-SNR steps comparable (no long last step).
    default_spacing = "trailing"
    description = "DPM-Solver++(2M), second-order multistep, 1 evaluation per step"
    # e^h = s/s' above which a step is first order. Measured on fashion-class (distance to a converged image,
    # /255), Karras 10/20 steps: ∞ (old) 45.6/3.7, 10: 8.6/3.6, 5: 8.6/3.9, 3: 8.6/4.5 (first order
    # throughout: 8.6/4.4); trailing grids (every ratio ≤ 2.05 after the first step) are unchanged.
    max_step_ratio: ClassVar[float] = 5.0

    def _coefficients(self, st: SamplerState) -> tuple[float, float, float | None, float]:
        """(a, b, c, h): x' = a·x + b·D with D = x0 + c·(x0 − x0_prev) (c None: first order), h the step."""
        sigma, sigma_next = st.sigmas[st.i], st.sigmas[st.i + 1]
        q = self._ratio(sigma, sigma_next)  # e^(−h)
        h = -math.log(q) if q > 0 else math.inf
        h_last = st.h_last if self._second_order(st) else None
        c = None if h_last is None else 0.5 * h / h_last
        return sigma_next / sigma, self._alpha(sigma_next) * (1 - q), c, h

    def _second_order(self, st: SamplerState) -> bool:
        """A previous x0, a finite previous step, and this step's e^h = 1/q in (1, max_step_ratio]; q = 0 when
        σ' = 0 or α(σ) = 0."""
        q = self._ratio(st.sigmas[st.i], st.sigmas[st.i + 1])
        return (
            st.old_denoised is not None
            and st.h_last is not None  # set together with old_denoised
            and math.isfinite(st.h_last)
            and q * self.max_step_ratio >= 1
        )

    def step(self, st: SamplerState, denoised: Tensor) -> None:
        a, b, c, h = self._coefficients(st)
        d = denoised if c is None else denoised + (denoised - _held(st.old_denoised)) * c
        st.x = st.x * a + d * b
        st.old_denoised, st.h_last = denoised, h
        st.i += 1

    def _step_kind(self, st: SamplerState) -> Hashable | None:
        return "second order" if self._second_order(st) else "first order"

    def _step_many(self, kind: Hashable, states: list[SamplerState], denoised: Tensor) -> None:
        coefficients = [self._coefficients(st) for st in states]
        x = _stack(states)
        a = _per_row([k[0] for k in coefficients], x)
        b = _per_row([k[1] for k in coefficients], x)
        d = denoised
        if kind == "second order":
            old = torch.cat([_held(st.old_denoised) for st in states])  # (N, C, H, W)
            d = denoised + (denoised - old) * _per_row([_held(k[2]) for k in coefficients], x)
        x = x * a + d * b  # (N, C, H, W), as `step` per row
        for st, k, row, den in zip(states, coefficients, x.split(1), denoised.split(1), strict=True):
            st.x, st.old_denoised, st.h_last = row, den, k[3]
            st.i += 1


# ---- stochastic (SDE) samplers ----------------------------------------------------------------------------


class EulerAncestral(Sampler):
    """Ancestral sampling (Ho et al. 2020, "DDPM", posterior q(x'|x, x0); k-diffusion sample_euler_ancestral).

    Split σ' into a deterministic part σ_down and fresh noise σ_up (in VE levels s = σ/α), η scaling σ_up.
    At η = 1 this is exactly the DDPM posterior step on the grid, in VP and in flow space.
    """

    name = "euler_ancestral"
    kind = "sde"
    description = "Euler ancestral / DDPM posterior sampling (η=1), first order, fresh noise each step"

    def step(self, st: SamplerState, denoised: Tensor) -> None:
        sigma, sigma_next = st.sigmas[st.i], st.sigmas[st.i + 1]
        st.i += 1
        if sigma_next == 0:
            st.x = denoised
            return
        q = self._ratio(sigma, sigma_next)  # s'/s
        up = min(1.0, self.eta * math.sqrt(1.0 - q * q))  # σ_up / s'
        down = math.sqrt(1.0 - up * up)  # σ_down / s'
        x = st.x * (sigma_next / sigma * down) + denoised * (self._alpha(sigma_next) * (1 - q * down))
        if up > 0:
            x = x + draw_step_noise(st.generator, st.x) * (sigma_next * up)
        st.x = x


class DPMPP2MSDE(Sampler):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++…", §4 SDE variant; k-diffusion, midpoint).

    x' = (σ'/σ)e^(−ηh)·x + α'(1 − e^(−(1+η)h))·D + σ'·sqrt(1 − e^(−2ηh))·z, D as in DPM++ 2M (first order
    on a step longer than h = log(max_step_ratio), as there).
    """

    name = "dpmpp_2m_sde"
    kind = "sde"
    default_spacing = "trailing"  # see DPMPP2M
    description = "DPM-Solver++(2M) SDE (η=1), second-order multistep with fresh noise each step"
    max_step_ratio: ClassVar[float] = DPMPP2M.max_step_ratio

    def step(self, st: SamplerState, denoised: Tensor) -> None:
        sigma, sigma_next = st.sigmas[st.i], st.sigmas[st.i + 1]
        st.i += 1
        if sigma_next == 0:
            st.x = denoised
            return
        q = self._ratio(sigma, sigma_next)  # e^(−h)
        h = -math.log(q) if q > 0 else math.inf
        q_eta = q**self.eta  # e^(−ηh)
        d = denoised
        if (
            st.old_denoised is not None
            and q * self.max_step_ratio >= 1
            and st.h_last is not None  # set together with old_denoised
            and math.isfinite(st.h_last)
        ):
            d = denoised + (denoised - st.old_denoised) * (0.5 * h / st.h_last)
        st.old_denoised, st.h_last = denoised, h
        x = st.x * (sigma_next / sigma * q_eta) + d * (self._alpha(sigma_next) * (1 - q * q_eta))
        if self.eta > 0:
            x = x + draw_step_noise(st.generator, st.x) * (sigma_next * math.sqrt(1 - q_eta * q_eta))
        st.x = x


# ---- flow-only names --------------------------------------------------------------------------------------


class FlowEuler(Euler):
    """Euler for rectified flow, x' = x + (σ' − σ)·v (Liu et al. 2022; FlowMatchEulerDiscreteScheduler)."""

    name = "flow_euler"
    model_kinds = ("flow",)
    description = "Euler on the flow ODE dx/dσ = v (FlowMatchEulerDiscreteScheduler)"


class FlowHeun(Heun):
    """Heun for rectified flow (Esser et al. 2024, SD3; diffusers FlowMatchHeunDiscreteScheduler)."""

    name = "flow_heun"
    model_kinds = ("flow",)
    description = "Heun on the flow ODE, second order, 2 evaluations per step (last step 1)"


class FlowEulerMaruyama(Sampler):
    """Euler–Maruyama on the reverse SDE with flow marginals (Ma et al. 2024, "SiT", §2.3; Song et al. 2021).

    dx = [v + (g²/2σ)·ε̂] dσ + g dW̄ with score −ε̂/σ, ε̂ = (x − (1 − σ)·x0)/σ, and g² = 2ησ. The step into
    σ' = 0 is deterministic (x' = x0), otherwise the last step would leave noise of size ~σ_last.
    """

    name = "flow_euler_maruyama"
    kind = "sde"
    model_kinds = ("flow",)
    description = "Euler–Maruyama on the flow reverse SDE (diffusion g²=2ησ), first order"

    def step(self, st: SamplerState, denoised: Tensor) -> None:
        sigma, sigma_next = st.sigmas[st.i], st.sigmas[st.i + 1]
        st.i += 1
        if sigma_next == 0:
            st.x = denoised
            return
        dt = sigma - sigma_next  # > 0: we integrate towards σ = 0
        # v + η·ε̂ = ((1 + η)·x − (1 + η(1 − σ))·x0)/σ
        drift = (st.x * (1 + self.eta) - denoised * (1 + self.eta * (1 - sigma))) / sigma
        x = st.x - drift * dt
        if self.eta > 0:
            x = x + draw_step_noise(st.generator, st.x) * math.sqrt(2 * self.eta * sigma * dt)
        st.x = x


# ---- registry ---------------------------------------------------------------------------------------------

_CLASSES = (DDIM, Euler, Heun, DPMPP2M, EulerAncestral, DPMPP2MSDE, FlowEuler, FlowHeun, FlowEulerMaruyama)
SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in _CLASSES}

# alias → (stable name, spacing override). Diffusers scheduler class names, A1111 UI names, k-diffusion names.
_ALIASES: dict[str, tuple[str, str | None]] = {
    "DDIMScheduler": ("ddim", None),
    "DDIM": ("ddim", None),
    "EulerDiscreteScheduler": ("euler", None),
    "Euler": ("euler", None),
    "k_euler": ("euler", None),
    "Euler Karras": ("euler", "karras"),
    "HeunDiscreteScheduler": ("heun", None),
    "Heun": ("heun", None),
    "k_heun": ("heun", None),
    "Heun Karras": ("heun", "karras"),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", None),
    "DPM++ 2M": ("dpmpp_2m", None),
    "k_dpmpp_2m": ("dpmpp_2m", None),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", None),
    "Euler a": ("euler_ancestral", None),
    "k_euler_a": ("euler_ancestral", None),
    "k_euler_ancestral": ("euler_ancestral", None),
    "DDPMScheduler": ("euler_ancestral", None),
    "DDPM": ("euler_ancestral", None),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", None),
    "k_dpmpp_2m_sde": ("dpmpp_2m_sde", None),
    "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "FlowMatchEulerDiscreteScheduler": ("flow_euler", None),
    "FlowMatchHeunDiscreteScheduler": ("flow_heun", None),
    "flow_sde": ("flow_euler_maruyama", None),
    "flow_em": ("flow_euler_maruyama", None),
}


def _norm(name: str) -> str:
    # "DPM++ 2M Karras", "dpm++_2m_karras" and "DPM++2MKarras" are the same name
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


_LOOKUP: dict[str, tuple[str, str | None]] = {_norm(n): (n, None) for n in SAMPLERS}
for _alias, _target in _ALIASES.items():
    assert _norm(_alias) not in _LOOKUP or _LOOKUP[_norm(_alias)] == _target, _alias
    _LOOKUP[_norm(_alias)] = _target


def resolve_sampler_name(name: str) -> tuple[str, str | None]:
    """(stable name, spacing override or None) for a stable name or alias; ValueError if unknown."""
    if not isinstance(name, str) or _norm(name) not in _LOOKUP:
        raise ValueError(
            f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)} (aliases: {', '.join(_ALIASES)})"
        )
    return _LOOKUP[_norm(name)]


def get_sampler(name: str, model_kind: str | None = None, **options: Any) -> Sampler:
    """A sampler by stable name or alias, bound to a model kind ("vp" or "flow", i.e. `schedule.kind`).

    Aliases can imply a spacing ("DPM++ 2M Karras" → dpmpp_2m with karras σ). options: `eta` for SDE
    samplers, `spacing` to override the default grid spacing. Raises ValueError for an unknown name or a
    model kind the sampler does not support. model_kind may be omitted for flow-only samplers; other
    samplers then refuse to `init` until bound (their noise/renoise formulas depend on the kind).
    """
    stable, spacing = resolve_sampler_name(name)
    spacing = options.pop("spacing", None) or spacing
    return SAMPLERS[stable](model_kind, spacing=spacing, **options)


def list_samplers() -> list[dict[str, Any]]:
    """Sampler catalogue for the API: name, aliases, kind (ode/sde), model_kinds, default spacing, …"""
    out = []
    for name, cls in SAMPLERS.items():
        aliases = [a for a, (target, _) in _ALIASES.items() if target == name]
        out.append(
            {
                "name": name,
                "aliases": aliases,
                "kind": cls.kind,
                "model_kinds": list(cls.model_kinds),
                "default_spacing": cls.default_spacing or "schedule",
                "evaluations_per_step": cls.evaluations_per_step,
                "description": cls.description,
            }
        )
    return out


def sample(
    denoise_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    sigmas: Tensor | Sequence[float],
    sampler: Sampler,
    generator: RequestNoise | torch.Generator | None = None,
) -> Tensor:
    """Run one request to the end: denoise_fn(x (B, …), sigma (B,) float64) → x0 estimate (B, …).

    noise is unit Gaussian (B, C, H, W); returns the sample in data space. Used by training eval and tests.
    """
    st = sampler.init(noise, sigmas, generator)
    while not sampler.done(st):
        x, sigma = sampler.next_input(st)
        sig = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device)
        sampler.advance(st, denoise_fn(x, sig))
    return sampler.result(st)
