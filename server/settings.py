"""Server settings from environment variables (prefix ``UNET_SERVER_``) or ``python -m server`` flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The engine core's thread shares a GIL: with the HTTP event loop (in-process) or with the pipe threads
# (engine process). CUDA calls release it, and a thread that wants it back waits until the holder yields: at
# the latest after the switch interval (5 ms by default), which under load would stall every step or delay
# every completion. 0.5 ms keeps those stalls short.
GIL_SWITCH_INTERVAL_S = 0.0005


def _split_list(value: object) -> object:
    """Accept a JSON list or a comma-separated string (the natural form in an env var)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything an operator can set. Each field is env var ``UNET_SERVER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="UNET_SERVER_", extra="ignore")

    # Folder holding one diffusers-layout folder per model (weights/<name>/).
    weights_dir: Path = Path("weights")
    # Model folder names to load; empty = every folder in weights_dir with an unet_server.json.
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # "auto" picks CUDA when available; "cuda:N" pins one GPU (with ``devices`` unset).
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")] = "auto"
    # Engine cores, one process each (server.devices): "auto" = one per visible GPU on CUDA, one on CPU;
    # "all" = every visible GPU; a count ("2"); or a list ("cuda:0,cuda:2"; a device may repeat: engines
    # sharing a card; "cpu,cpu": two engines on the CPU). Every engine holds its own copy of the models.
    devices: str = "auto"
    # Serve once this many engines are ready (the others are reported by /health/ready and keep loading
    # or stay failed); None = all of them.
    min_engines: int | None = Field(None, ge=1)
    # U-Net weights dtype; "auto" = float16 on CUDA, float32 on CPU. Sampler arithmetic is always fp32.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # VAE dtype of latent (Stable Diffusion) models. "auto" = fp32 when the VAE config sets force_upcast and
    # the U-Net runs in fp16 (the SD VAEs overflow fp16), else the U-Net's dtype. "bfloat16" has fp32's
    # exponent range (no overflow) at fp16 speed on Ampere/Hopper: the fp32 decode is a quarter of the device
    # time of SD1.5 at 512² on an H200 (issue 17); pixels move by a fraction of a level in 255.
    vae_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # The VAE decoder's GroupNorm+SiLU (latent models): "triton" = model.fused_groupnorm's kernels (fp32
    # statistics; on an H200 they halve the SD1.5 512² decode: 21.6 -> 12.5 ms/image fp32, 16.8 -> 9.0 bf16,
    # bench.vae_decode, RESULTS run 21), "torch" = torch ops, "auto" = triton on CUDA when Triton is
    # installed, else torch. "triton" where it cannot run (no CUDA, no Triton) fails the start-up.
    vae_groupnorm: Literal["auto", "torch", "triton"] = "auto"
    # Attention backend; "auto" probes xformers, then sdpa, then math by running a tiny call.
    attention_backend: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    # Most rows (images x CFG halves) in one forward pass; also the largest batch bucket. "auto" = 128 when
    # the server runs on CUDA (graph replay makes big buckets cheap), 64 on CPU; resolved at validation.
    max_batch_rows: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = "auto"
    # Forward passes are padded up to one of these sizes, each warmed at startup. Multiples of 4 keep CPU
    # fp32 GEMMs batch-invariant (MKL blocks rows by 4), so a seed gives the same bytes alone or batched.
    batch_buckets: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [4, 8, 16, 32, 64])
    # On CUDA, run the denoiser through CUDA graphs captured per bucket at warm-up (no effect on CPU).
    cuda_graphs: bool = True
    # On CUDA, torch.compile each U-Net and ControlNet (mode "default", static shapes) before warm-up; the
    # warm-up then compiles every bucket (slow start-up), graphs capture the compiled kernels. CPU: ignored.
    compile: bool = False
    # Where the engine (scheduler + device loop) runs: "process" = a child process with its own interpreter
    # and GIL, so HTTP handling never delays a step; "thread" = a thread of the server process (engine
    # internals inspectable, no spawn cost); "auto" = process when the models go on CUDA, else thread.
    engine_mode: Literal["auto", "thread", "process"] = "auto"
    # On CUDA, how many steps the engine may enqueue before the device has finished them. 1 overlaps one
    # step's host work with the previous step's kernels; more hides host hiccups but delays a new
    # request's first step and a finished request's read-back by about one step each (H100, fashion-class,
    # 64 closed-loop clients: 503 img/s with 1, 482 with 2; bench/RESULTS.md run 8).
    max_steps_ahead: int = Field(1, ge=1, le=8)
    # Requests admitted but not yet started; beyond this a request gets 429.
    max_queue_size: int = Field(256, ge=1)
    # Refuse (503 + Retry-After) a request that, at the engine's measured pace and the work already
    # admitted, would finish after its deadline, instead of letting it time out in the queue.
    shed_load: bool = True
    # With shed_load: shed when the estimated finish is past this fraction of the deadline. The estimate is a
    # mean, so a request admitted right at its deadline misses it about half the time. H200 at 1.5x overload
    # with a 1 s deadline, by the client's clock (bench/RESULTS.md run 22e): at 0.8, 2% of the admitted
    # requests arrived late (p99 1017 ms); at 0.5, none (p99 644 ms), at the same throughput. Lower trades a
    # few more 503s for a shorter queue, i.e. lower latency of what is admitted.
    shed_deadline_fraction: float = Field(0.5, gt=0, le=1)
    # With shed_load: while the event loop stays more than this many seconds behind (or a fifth of
    # request_timeout_seconds, if less) with many requests in flight, new generation requests get 503 +
    # Retry-After before their body is read. Admission cannot see the time a request waits for a saturated
    # front end (socket backlog, ready queue); this bounds it. 0 turns it off. See server/looplag.py.
    shed_loop_lag_seconds: float = Field(0.5, ge=0)
    # Log a warning with the stack the event loop's thread is running when the loop has been blocked this
    # long (one line per stall; counted in unet_server_event_loop_stalls_total). 0 turns it off.
    loop_stall_log_seconds: float = Field(1.0, ge=0)
    # Deadline of a /generate or /v1/images/generations request, from arrival (504 past it).
    request_timeout_seconds: float = Field(120.0, gt=0)
    # Deadline of a /v1/jobs job, from arrival.
    job_timeout_seconds: float = Field(3600.0, gt=0)
    # zlib level of the PNGs the server returns. 1 (default): Pillow's adaptive row filters + the fastest
    # zlib level; higher levels squeeze a little more for several times the CPU; 0: uncompressed, for clients
    # on a fast link (the encode is on every request's latency path). A smooth 512² RGB image on the 2-core
    # CI machine: level 1 390 KB in ~31 ms, level 0 768 KB in ~1 ms, level 6 333 KB in ~165 ms.
    png_compress_level: int = Field(1, ge=0, le=9)
    # Finished jobs kept for GET /v1/jobs/{id} (oldest dropped first).
    max_finished_jobs: int = Field(1000, ge=1)
    # Caps on request fields.
    max_inference_steps: int = Field(200, ge=1)
    max_images: int = Field(8, ge=1)
    # Largest width/height a request may ask for. None: each model's native size (what it was trained at;
    # a U-Net sampled far beyond it repeats itself). A number: that cap for every model.
    max_image_size: int | None = Field(None, ge=8)
    # Control image limits: encoded bytes and decoded pixels (checked before decoding pixels).
    max_control_image_bytes: int = Field(2_000_000, ge=1)
    max_control_image_pixels: int = Field(1024 * 1024, ge=1)
    # A model that fails to load (a broken folder, the text extra not installed): False = the server fails
    # (/health/ready "failed", naming every such model); True = serve the models that load and report the
    # others in /health/ready and /v1/models ("unavailable").
    skip_broken_models: bool = False
    # Optional bearer token; when set every /generate, /v1/* request must send it.
    api_key: SecretStr | None = None
    # Bind address for `python -m server`.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # Log lines as text ("2026-01-02 03:04:05,678 INFO [server] name: message") or one JSON object per line.
    log_format: Literal["text", "json"] = "text"

    @field_validator("models", "batch_buckets", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _buckets(self) -> Settings:
        if self.max_batch_rows == "auto":
            self.max_batch_rows = 128 if self._on_cuda() else 64
        buckets = sorted({int(b) for b in self.batch_buckets if 0 < int(b) <= self.max_batch_rows})
        if not buckets or buckets[-1] != self.max_batch_rows:
            buckets.append(self.max_batch_rows)
        self.batch_buckets = buckets
        return self

    @property
    def batch_rows(self) -> int:
        """``max_batch_rows`` as resolved at validation ("auto" is replaced by a number there)."""
        assert isinstance(self.max_batch_rows, int)
        return self.max_batch_rows

    def _on_cuda(self) -> bool:
        """Whether the server will run on CUDA (``device="auto"`` asks torch, as the loader does)."""
        if self.device != "auto":
            return self.device.startswith("cuda")
        import torch

        return torch.cuda.is_available()
