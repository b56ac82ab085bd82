"""Shared helpers of the benchmarks: arguments, timing, FLOP counting, tables, result files.

Every script runs the same code on CPU (``--device cpu --quick``: tiny sizes, 1-2 iterations, to exercise
every path) and on CUDA (real sizes; CUDA events, warm-up, medians).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# Dense fp16/bf16 tensor-core peak of the H100 SXM and H200 (the datasheet's "without sparsity" figure).
PEAK_FP16_TFLOPS = 989.0
REPO = Path(__file__).resolve().parent.parent


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1-2 iterations (CPU smoke test)")
    parser.add_argument("--out", default=None, help="folder for <name>.json and <name>.md (e.g. $OUT)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip remaining configs past this")
    parser.add_argument("--weights-dir", default=str(REPO / "weights"))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def setup_torch(device: torch.device) -> None:
    """Same settings for every variant: cuDNN autotuning on, TF32 allowed for fp32 leftovers."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def set_sdpa_backend(name: str) -> None:
    """Restrict ``F.scaled_dot_product_attention`` to one kernel family for the whole process (both sides of
    a comparison; torch.compile picks the kernel when it traces, so set this before compiling). "auto"
    leaves torch's own choice (on an H200 with torch 2.11: cuDNN's flash kernel for SD's shapes)."""
    if name not in SDPA_BACKENDS:
        raise ValueError(f"sdpa backend {name!r} is not one of {SDPA_BACKENDS}")
    if name == "auto":
        return
    b = torch.backends.cuda
    b.enable_flash_sdp(name == "flash")
    b.enable_mem_efficient_sdp(name == "efficient")
    b.enable_cudnn_sdp(name == "cudnn")
    b.enable_math_sdp(name == "math")


def env_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        info["diffusers"] = f"unavailable ({type(e).__name__}: {e})"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        info["git"] = rev.stdout.strip() or None
        # A copy of the tree (e.g. on the lent GPU machine) may carry an older .git: say when the files
        # differ from that commit, so a stale hash is never read as the measured code.
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True)
        if info["git"] and dirty.returncode == 1:
            info["git"] += "+modified"
    except OSError:
        info["git"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["sm_count"] = props.multi_processor_count
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def env_line(info: dict[str, Any]) -> str:
    return (
        f"device: {info['device']} | torch {info['torch']} (CUDA {info['cuda']})"
        f" | diffusers {info['diffusers']} | python {info['python']} | git {info.get('git')}"
        f" | {info['date_utc']} UTC"
    )


# --- timing -----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    quick: bool = False,
    target_ms: float = 20.0,
    repeats: int = 5,
    warmup: int = 3,
) -> dict[str, float]:
    """Median wall time of one ``fn()`` in ms, as the caller sees it in a steady loop.

    Each repeat runs ``iters`` calls back to back between two CUDA events (so launch overhead counts, as it
    does for a real caller), ``iters`` chosen so that a repeat lasts about ``target_ms``.
    """
    if quick:
        warmup, repeats = min(warmup, 1), 1
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    iters = 1 if quick else max(1, min(50, int(target_ms / max(first_ms, 1e-3))))
    per_call = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            per_call.append((time.perf_counter() - t0) * 1e3 / iters)
    med = statistics.median(per_call)
    return {
        "median_ms": med,
        "min_ms": min(per_call),
        "spread_pct": 100.0 * (max(per_call) - min(per_call)) / med if med > 0 else 0.0,
        "iters": iters,
        "repeats": repeats,
    }


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict that gets ``peak_mib``: the most memory allocated (all tensors) inside the block."""
    box: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield box
    if device.type == "cuda":
        box["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        box["peak_mib"] = float("nan")


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call by torch.utils.flop_counter (matmuls, convs, attention; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def mfu(flops: float, ms: float, peak_tflops: float = PEAK_FP16_TFLOPS) -> float:
    """Model FLOP utilisation in % of the fp16 dense peak."""
    if not ms or math.isnan(ms):
        return float("nan")
    return 100.0 * flops / (ms * 1e-3) / (peak_tflops * 1e12)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Budget:
    """Wall-clock budget for one script: later configs are skipped (and reported as skipped) past it."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds


# --- tables and files -------------------------------------------------------------------------------


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01 or v == 0:
            return f"{v:.2f}"
        return f"{v:.1e}"
    return str(v)


def render_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def render_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


class Report:
    """Collects tables and notes of one script; prints them and rewrites <out>/<name>.{json,md} as it goes
    (so a run killed at its time limit still leaves what it measured)."""

    def __init__(self, name: str, info: dict[str, Any], args: argparse.Namespace):
        self.name = name
        self.info = info
        self.out = Path(args.out) if args.out else None
        self.command = " ".join([Path(sys.executable).name, "-m", f"bench.{name}"] + sys.argv[1:])
        self.tables: list[dict[str, Any]] = []
        self.notes: list[str] = []
        print(f"== bench.{name} == {env_line(info)}", flush=True)

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)
        self.save()

    def table(self, title: str, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
        self.tables.append({"title": title, "columns": list(columns), "rows": rows})
        self.save()

    def save(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        doc = self.doc()
        # JSON only (few files come back from the GPU machine); bench.summarize renders the markdown.
        (self.out / f"{self.name}.json").write_text(json.dumps(doc, indent=1, default=str))

    def doc(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "command": self.command,
            "env": self.info,
            "notes": self.notes,
            "tables": self.tables,
        }

    def print_all(self, long_tables: bool = True) -> None:
        """The final tables, printed last so that the tail of the output carries them.

        ``long_tables=False`` leaves out tables titled "... (long)" (they are in the files)."""
        print(f"\n==== bench.{self.name} results ====\n{env_line(self.info)}")
        for t in self.tables:
            if not long_tables and t["title"].endswith("(long)"):
                continue
            print(f"\n-- {t['title']} --")
            print(render_table(t["rows"], t["columns"]))
        for n in self.notes:
            print(f"note: {n}")
        sys.stdout.flush()
        self.save()


def doc_markdown(doc: dict[str, Any]) -> str:
    """One benchmark's result document (as Report writes it) as markdown."""
    parts = [
        f"## bench.{doc['benchmark']}",
        "",
        f"`{env_line(doc['env'])}`",
        "",
        f"Command: `{doc['command']}`",
        "",
    ]
    for t in doc["tables"]:
        parts += [f"### {t['title']}", "", render_markdown(t["rows"], t["columns"]), ""]
    if doc["notes"]:
        parts += ["Notes:", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(parts)


def env_flag(name: str, default: str = "") -> str:
    return os.environ.get(name, default)
