"""Training noise schedules (VP betas, rectified flow) and sampling σ grids.

Every sampler works on a noise level σ per row in a "VE-like" space where the probability-flow ODE reads
dx/dσ = (x − x0)/σ:

* VP models (ε / v / sample prediction): σ = sqrt((1 − ᾱ)/ᾱ) and x_σ = x0 + σ·ε, i.e. the VP sample divided by
  sqrt(ᾱ). The denoiser feeds the U-Net c_in·x = x/sqrt(1 + σ²) (exactly the VP sample) and the training
  timestep t(σ), interpolated in log σ over the training table as k-diffusion does.
* flow models (rectified flow, velocity prediction): σ = flow time in [0, 1], x_σ = (1 − σ)·x0 + σ·ε; the
  U-Net sees x and t = σ·num_train_timesteps.

A grid is a float64 CPU tensor (num_inference_steps + 1,) of decreasing σ that ends in 0. Its first entry is
the σ of the first timestep; samplers scale unit initial noise to it (see `initial_noise_scale`).
"""

from __future__ import annotations

import math
from typing import Any, overload

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace", "karras")
_FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
_VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) squaredcos_cap_v2 betas, computed the way diffusers does (fp32 result)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _betas(config: dict[str, Any], num_train_timesteps: int) -> torch.Tensor:
    # fp32 like diffusers, so ᾱ (and therefore σ and the DDIM coefficients) match its tables bit for bit.
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float32)
    beta_schedule = config.get("beta_schedule", "linear")
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise ValueError(
        f"unsupported beta_schedule {beta_schedule!r}: "
        "expected one of 'linear', 'scaled_linear', 'squaredcos_cap_v2'"
    )


@overload
def flow_shift(sigma: np.ndarray, shift: float) -> np.ndarray: ...
@overload
def flow_shift(sigma: float, shift: float) -> float: ...
def flow_shift(sigma: np.ndarray | float, shift: float) -> np.ndarray | float:
    """Timestep shift of SD3 / FlowMatchEulerDiscreteScheduler: σ' = shift·σ / (1 + (shift − 1)·σ)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


class Schedule:
    """A model's training noise schedule, read from a diffusers scheduler_config.json dict.

    Attributes:
        kind: "vp" or "flow".
        prediction_type: "epsilon", "v_prediction", "sample" (vp) or "flow" (velocity, flow models).
        num_train_timesteps: T of the training schedule.
        sigmas: (T,) float64 σ of every training timestep 0..T−1, increasing with t.
        alphas_cumprod: (T,) fp32 ᾱ (vp only, else None).
        timestep_spacing: the config's grid spacing ("leading", "trailing", "linspace"; flow: "linspace").
        steps_offset: added to "leading" timesteps (diffusers' steps_offset).
        shift: flow time shift (1.0 for vp).
        clip_sample_range: x0 clamp range if the config asks for clip_sample, else None (the Denoiser does not
            clip by itself; see `model.denoiser.clamp_x0`).
        dynamic_thresholding_ratio: the config's dynamic thresholding quantile if `thresholding`, else None.
        config: the dict it came from.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        class_name = str(config.get("_class_name", ""))
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        T = self.num_train_timesteps
        is_flow = class_name in _FLOW_CLASSES or bool(config.get("use_flow_sigmas", False))
        if is_flow:
            if config.get("use_dynamic_shifting", False):
                raise ValueError("flow schedules with use_dynamic_shifting=True are not supported")
            self.kind = "flow"
            self.prediction_type = "flow"
            self.shift = float(config.get("shift", config.get("flow_shift", 1.0)))
            self.timestep_spacing = "linspace"
            self.steps_offset = 0
            self.alphas_cumprod = None
            # FlowMatchEulerDiscreteScheduler's training table: σ = shift(t/T) for t = T..1.
            train = flow_shift(np.linspace(1, T, T, dtype=np.float64) / T, self.shift)
            self.sigmas = torch.from_numpy(train)
            self._sigma_max = 1.0
            self._sigma_min = float(flow_shift(1.0 / T, self.shift))
        else:
            prediction_type = config.get("prediction_type", "epsilon")
            if prediction_type not in _VP_PREDICTIONS:
                raise ValueError(
                    f"unsupported prediction_type {prediction_type!r}: "
                    f"expected one of {', '.join(_VP_PREDICTIONS)}"
                )
            if config.get("rescale_betas_zero_snr", False):
                raise ValueError("rescale_betas_zero_snr=True gives σ_max = ∞ (unsupported)")
            self.kind = "vp"
            self.prediction_type = prediction_type
            self.shift = 1.0
            self.timestep_spacing = config.get("timestep_spacing", "leading")
            if self.timestep_spacing not in ("leading", "trailing", "linspace"):
                raise ValueError(f"unsupported timestep_spacing {self.timestep_spacing!r}")
            self.steps_offset = int(config.get("steps_offset", 0))
            betas = _betas(config, T)
            if betas.shape != (T,):
                raise ValueError(f"trained_betas has {betas.numel()} entries, num_train_timesteps={T}")
            self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,) fp32, as diffusers
            ac = self.alphas_cumprod.double()
            self.sigmas = ((1 - ac) / ac).sqrt()  # (T,) float64, increasing
            self._sigma_max = float(self.sigmas[-1])
            self._sigma_min = float(self.sigmas[0])
        self.clip_sample_range = (
            float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
        )
        thresholding = config.get("thresholding", False)
        ratio = float(config.get("dynamic_thresholding_ratio", 0.995))
        self.dynamic_thresholding_ratio = ratio if thresholding else None
        self._log_sigmas: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_config(cls, scheduler_config: dict[str, Any]) -> Schedule:
        """Build from a diffusers scheduler_config.json dict (`_class_name` tells VP from flow)."""
        return cls(scheduler_config)

    @property
    def sigma_max(self) -> float:
        """Largest σ of the training schedule (σ of t = T − 1; 1.0 for flow)."""
        return self._sigma_max

    @property
    def sigma_min(self) -> float:
        """Smallest positive σ of the training schedule (σ of t = 0; shift(1/T) for flow)."""
        return self._sigma_min

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model timestep for each σ: (B,) → (B,) same dtype/device.

        VP: t interpolated linearly in log σ between neighbouring training timesteps (k-diffusion's
        `sigma_to_t`), so a σ taken from the table gives back its integer timestep. Flow: t = σ·T.
        """
        if self.kind == "flow":
            return sigma * self.num_train_timesteps
        # float64 keeps t exact to ~1e-6 for table σ passed as fp32; MPS has no float64.
        work = torch.float32 if sigma.device.type == "mps" else torch.float64
        log_sigmas = self._log_sigmas.get(sigma.device)
        if log_sigmas is None or log_sigmas.dtype != work:
            log_sigmas = self.sigmas.log().to(device=sigma.device, dtype=work)
            self._log_sigmas[sigma.device] = log_sigmas
        log_sigma = sigma.to(work).clamp_min(1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, log_sigmas.numel() - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (low.to(work) + w).to(sigma.dtype)

    def alpha(self, sigma: float) -> float:
        """Signal coefficient of x_σ = α·x0 + σ·ε in sampler space: 1 (vp, VE form) or 1 − σ (flow)."""
        return 1.0 - sigma if self.kind == "flow" else 1.0

    def __repr__(self) -> str:
        return (
            f"Schedule(kind={self.kind!r}, prediction_type={self.prediction_type!r}, "
            f"T={self.num_train_timesteps}, "
            f"sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g}, shift={self.shift})"
        )


def initial_noise_scale(model_kind: str, sigma_max: float) -> float:
    """Factor that turns unit Gaussian noise into x at the first grid σ.

    VP: sqrt(1 + σ²), so that c_in·x = noise, which is exactly diffusers' VP init x_T = noise (DDIM parity
    depends on this). Flow: 1 (x = noise at σ = 1).
    """
    return math.sqrt(1.0 + sigma_max**2) if model_kind == "vp" else 1.0


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    # Karras et al. (2022) eq. 5: uniform in σ^(1/ρ).
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _vp_timesteps(schedule: Schedule, n: int, spacing: str) -> np.ndarray:
    # Exactly DDIMScheduler.set_timesteps (EulerDiscreteScheduler agrees for leading/trailing).
    T = schedule.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + schedule.steps_offset
    # trailing: diffusers' expression, cut to n entries. A float-step arange can overshoot by one element
    # (T=300, n=7 gives 8 values, the last ≈ 1.7e-13, i.e. timestep −1; diffusers 0.42 has this bug in every
    # scheduler). The first n entries are exactly diffusers' values, so parity holds wherever it is valid.
    return np.round(np.arange(T, 0, -T / n)[:n]).astype(np.int64) - 1


def make_sigmas(
    schedule: Schedule,
    num_inference_steps: int,
    spacing: str | None = None,
    *,
    max_steps: int | None = None,
) -> torch.Tensor:
    """Sampling grid: float64 CPU tensor (num_inference_steps + 1,) of decreasing σ ending in 0.

    spacing: None → the schedule's `timestep_spacing`.
      VP: "leading" / "trailing" / "linspace" pick integer training timesteps exactly as diffusers'
      DDIMScheduler does (σ = table σ of those timesteps); "karras" is Karras et al. ρ=7 between the table's
      σ_min and σ_max (timesteps then fractional via `Schedule.sigma_to_t`).
      Flow: "linspace" / "leading" are FlowMatchEulerDiscreteScheduler's grid (t linear from T to
      T·shift(1/T), then shifted — diffusers applies the shift to σ_min twice, and so do we for parity);
      "trailing" is shift(1 − i/n), i = 0..n (uniform flow time, like DPMSolverMultistepScheduler's
      use_flow_sigmas grid but starting at exactly σ = 1); "karras" spaces FlowMatch's endpoints Karras-style.
    max_steps: optional server cap; steps above it (or < 1) raise ValueError.
    """
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool):
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if max_steps is not None and num_inference_steps > max_steps:
        raise ValueError(f"num_inference_steps={num_inference_steps} is above the maximum of {max_steps}")
    spacing = schedule.timestep_spacing if spacing is None else spacing
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: expected one of {', '.join(SPACINGS)}")
    n = num_inference_steps
    T = schedule.num_train_timesteps
    if schedule.kind == "flow":
        if spacing == "trailing":
            # Uniform flow time from 1 (σ_i = shift(1 − i/n)), so the last positive σ is shift(1/n) and not
            # FlowMatch's tiny shift(shift(1/T)): a regular last step that multistep solvers can extrapolate.
            sig = flow_shift(np.linspace(1.0, 0.0, n + 1)[:-1], schedule.shift)
        else:
            ts = np.linspace(schedule.sigma_max * T, schedule.sigma_min * T, n)
            sig = flow_shift(ts / T, schedule.shift)
        if spacing == "karras":
            sig = _karras(float(sig[-1]), float(sig[0]), n)
    elif spacing == "karras":
        sig = _karras(schedule.sigma_min, schedule.sigma_max, n)
    else:
        # Integer timesteps cannot give more distinct levels than the table has.
        if n > T:
            raise ValueError(f"num_inference_steps={n} exceeds num_train_timesteps={T} ({spacing!r} spacing)")
        ts = _vp_timesteps(schedule, n, spacing)
        if ts.max() >= T or ts.min() < 0:  # reachable with "leading" and a large steps_offset
            bad = ts.max() if ts.max() >= T else ts.min()
            raise ValueError(
                f"{spacing!r} spacing with steps_offset={schedule.steps_offset} gives timestep {bad} "
                f"outside 0..{T - 1} for num_inference_steps={n}"
            )
        sig = schedule.sigmas.numpy()[ts]
    return torch.from_numpy(np.append(np.asarray(sig, dtype=np.float64), 0.0))
