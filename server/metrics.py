"""Every Prometheus object of the server, registered on a per-app registry (tests build many apps)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Per-engine series: the engine's index (0, 1, ...) and its device ("cuda:0", "cpu").
ENGINE_LABELS = ("engine", "device")


class Metrics:
    """The server's metrics; names carry the ``unet_server_`` prefix and their unit."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "unet_server_requests_total",
            "Generation requests by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.request_duration_seconds = Histogram(
            "unet_server_request_duration_seconds",
            "End-to-end time of a generation request (arrival to response).",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "unet_server_queue_wait_seconds",
            "Time from admission to a request's first forward pass.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_size = Gauge(
            "unet_server_queue_size", "Admitted requests not yet in any forward pass.", registry=r
        )
        # Rows (images x CFG halves), not requests: a row is the unit of GPU work, so this grows in
        # proportion to load below saturation too, which a proportional autoscaler needs (the queue is
        # ~0 until a pod saturates). deploy/helm's HPA targets its per-pod average.
        self.outstanding_rows = Gauge(
            "unet_server_outstanding_rows",
            "Rows of admitted requests, waiting and running; the load signal for autoscaling.",
            registry=r,
        )
        self.engine_outstanding_rows = Gauge(
            "unet_server_engine_outstanding_rows",
            "Rows of admitted requests routed to one engine, waiting and running.",
            ENGINE_LABELS,
            registry=r,
        )
        self.engine_queue_size = Gauge(
            "unet_server_engine_queue_size",
            "Admitted requests routed to one engine and not yet in any of its forward passes.",
            ENGINE_LABELS,
            registry=r,
        )
        self.engines_serving = Gauge(
            "unet_server_engines_serving",
            "Engine cores serving now (loaded, warmed, not restarting).",
            registry=r,
        )
        self.running_requests = Gauge(
            "unet_server_running_requests", "Requests sampling now (started, not finished).", registry=r
        )
        self.rows_per_forward = Histogram(
            "unet_server_rows_per_forward",
            "Real rows (images x CFG halves, without padding) in one U-Net forward pass.",
            ENGINE_LABELS,
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.padded_rows_per_forward = Histogram(
            "unet_server_padded_rows_per_forward",
            "Rows of one forward pass after padding to its batch bucket.",
            ENGINE_LABELS,
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.forward_duration_seconds = Histogram(
            "unet_server_forward_duration_seconds",
            "Wall time of one engine step (gather, denoiser forward, CFG, sampler advance).",
            ENGINE_LABELS,
            buckets=_FORWARD_BUCKETS,
            registry=r,
        )
        self.images_generated_total = Counter(
            "unet_server_images_generated_total", "Images returned to clients.", ["model"], registry=r
        )
        self.model_evaluations_total = Counter(
            "unet_server_model_evaluations_total",
            "U-Net function evaluations: one per real row per forward pass.",
            ["model"],
            registry=r,
        )
        self.engine_errors_total = Counter(
            "unet_server_engine_errors_total", "Engine steps that raised (their requests failed).", registry=r
        )
        self.shed_requests_total = Counter(
            "unet_server_shed_requests_total",
            "Requests refused at admission (503) because at the current load they would miss their deadline.",
            registry=r,
        )
        self.front_shed_requests_total = Counter(
            "unet_server_front_shed_requests_total",
            "Requests refused (503) before their body was read because the event loop ran behind "
            "(shed_loop_lag_seconds).",
            registry=r,
        )
        self.event_loop_lag_seconds = Gauge(
            "unet_server_event_loop_lag_seconds",
            "How late a 10 ms timer on the server's event loop fires (a new request's wait before the app).",
            registry=r,
        )
        self.event_loop_delay_seconds = Histogram(
            "unet_server_event_loop_delay_seconds",
            "Lateness of each 10 ms timer on the server's event loop: its distribution over time (the gauge "
            "unet_server_event_loop_lag_seconds is the latest).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.event_loop_stalls_total = Counter(
            "unet_server_event_loop_stalls_total",
            "Times the event loop was blocked longer than loop_stall_log_seconds (each logged with the stack "
            "it was running).",
            registry=r,
        )
        self.prompt_cache_total = Counter(
            "unet_server_prompt_cache_total",
            "Prompt encodings by cache result: hit (served from the LRU cache) or miss (encoded).",
            ["result"],
            registry=r,
        )
        self.nonfinite_outputs_total = Counter(
            "unet_server_nonfinite_outputs_total",
            "Requests failed because the model produced NaN or infinite values (no image was returned).",
            ["model"],
            registry=r,
        )
        self.lora_adapters_resident = Gauge(
            "unet_server_lora_adapters_resident",
            "LoRA adapters in an engine's device pages now.",
            ENGINE_LABELS,
            registry=r,
        )
        self.lora_loads_total = Counter(
            "unet_server_lora_loads_total",
            "LoRA adapters copied into device pages (from their parsed host copy).",
            registry=r,
        )
        self.lora_evictions_total = Counter(
            "unet_server_lora_evictions_total",
            "LoRA adapters evicted from device pages, least recently used first (kept in host memory).",
            registry=r,
        )
        self.lora_rows_per_forward = Histogram(
            "unet_server_lora_rows_per_forward",
            "Rows of one forward pass that carry at least one LoRA adapter.",
            ENGINE_LABELS,
            buckets=(0,) + _ROW_BUCKETS,
            registry=r,
        )
        # Created by set_gpu_memory_source when the device is CUDA; absent on CPU.
        self.gpu_memory_allocated_bytes: Gauge | None = None

    def set_gpu_memory_source(self, engine: str, device: str, read: Callable[[], float]) -> None:
        """Expose ``unet_server_gpu_memory_allocated_bytes`` for one engine, sampled from ``read`` at scrape
        time."""
        if self.gpu_memory_allocated_bytes is None:
            self.gpu_memory_allocated_bytes = Gauge(
                "unet_server_gpu_memory_allocated_bytes",
                "torch.cuda.memory_allocated() of an engine on its device.",
                ENGINE_LABELS,
                registry=self.registry,
            )
        self.gpu_memory_allocated_bytes.labels(engine, device).set_function(read)

    def render(self) -> bytes:
        """The text exposition format of this registry."""
        return generate_latest(self.registry)
