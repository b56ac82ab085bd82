"""Read the result files of a run (``<dir>/{unet_forward,sampling_loop,server_load}.json``), write
``<dir>/bench_results.md`` (every table, plus goals vs measured) and print a compact summary.

    python -m bench.summarize $OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.common import doc_markdown, env_line, render_markdown, render_table

# The goals of issue 7 (same GPU, same run).
SD_STEP_MS = 8.0  # one guided SD1.5 step = U-Net at batch 2
STABLE_FAST_MS = 1e3 / 104.6  # stable-fast's published SD1.5 batch-1 it/s on an H100
SMALL_B1_MS = 1.5


def long_rows(doc: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not doc:
        return []
    return [r for t in doc["tables"] if t["title"].endswith("(long)") for r in t["rows"]]


def best(rows, model: str, batch: int, prefix: str = "ours"):
    cands = [r for r in rows if r["model"] == model and r["batch"] == batch]
    cands = [r for r in cands if r["variant"].startswith(prefix) and "ms" in r]
    return min(cands, key=lambda r: r["ms"]) if cands else None


def unet_goals(doc) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = long_rows(doc)
    goals: list[dict[str, Any]] = []
    compact: list[dict[str, Any]] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for b in sorted({r["batch"] for r in rows if r["model"] == model}):
            ours, base = best(rows, model, b), best(rows, model, b, "diffusers")
            at_b = [r for r in rows if r["model"] == model and r["batch"] == b]
            diff_eager = next((r for r in at_b if r["variant"] == "diffusers"), None)
            line = {"model": model, "batch": b}
            if diff_eager and "ms" in diff_eager:
                line["diffusers ms"] = diff_eager["ms"]
            if base:
                line["best diffusers"] = f"{base['ms']:.2f} ({base['variant']})"
            if ours:
                line.update(
                    {
                        "best ours ms": ours["ms"],
                        "variant": ours["variant"].removeprefix("ours "),
                        "img/s": ours["img_s"],
                        "MFU %": ours["mfu_pct"],
                        "err": ours.get("err_vs_diffusers"),
                    }
                )
                if "diffusers ms" in line:
                    line["speedup"] = line["diffusers ms"] / ours["ms"]
            compact.append(line)

    def get(model, b, key):
        return next((c.get(key) for c in compact if c["model"] == model and c["batch"] == b), None)

    def add(goal, target, measured, ok):
        met = None if measured is None else ok
        goals.append({"goal": goal, "target": target, "measured": measured, "met": met})

    m = get("sd15", 2, "best ours ms")
    add("SD1.5 guided step (U-Net batch 2), ms", f"<= {SD_STEP_MS}", m, m is not None and m <= SD_STEP_MS)
    add("  ... vs stable-fast 104.6 it/s (9.6 ms)", "< 9.6", m, m is not None and m < STABLE_FAST_MS)
    s = get("sd15", 2, "speedup")
    add("SD1.5 batch 2 speedup vs diffusers eager", ">= 3", s, s is not None and s >= 3)
    u = get("sd15", 32, "MFU %")
    add("SD1.5 batch 32 MFU (% of 989 TFLOP/s)", ">= 50", u, u is not None and u >= 50)
    s = get("sd15", 32, "speedup")
    add("SD1.5 batch 32 speedup vs diffusers eager", ">= 1.8", s, s is not None and s >= 1.8)
    for model in dict.fromkeys(c["model"] for c in compact):
        if model != "sd15":
            m = get(model, 1, "best ours ms")
            add(f"{model} batch 1, ms", f"<= {SMALL_B1_MS}", m, m is not None and m <= SMALL_B1_MS)
    return goals, compact


def sampling_compact(doc) -> list[dict[str, Any]]:
    if not doc:
        return []
    keys = ("model", "variant", "images", "forward", "ms_per_step", "img_s", "vs_diffusers", "error")
    return [{k: r.get(k) for k in keys} for t in doc["tables"] for r in t["rows"]]


def server_parts(doc) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not doc:
        return [], []
    tables = {t["title"]: t for t in doc["tables"]}
    goals = tables.get("goals", {"rows": []})["rows"]
    rows = tables.get("server load", {"rows": []})["rows"]
    keys = ("server", "point", "img_s", "p50_ms", "p99_ms", "rows_per_fwd", "step_ms", "errors")
    return goals, [{k: r.get(k) for k in keys} for r in rows]


def main(argv: list[str] | None = None) -> None:
    folder = Path((argv or sys.argv[1:] or ["."])[0])
    docs = {}
    for name in ("unet_forward", "sampling_loop", "server_load"):
        path = folder / f"{name}.json"
        docs[name] = json.loads(path.read_text()) if path.exists() else None
    env = next((d["env"] for d in docs.values() if d), None)

    goals, compact = unet_goals(docs["unet_forward"])
    sgoals, srows = server_parts(docs["server_load"])
    goals += sgoals
    sampling = sampling_compact(docs["sampling_loop"])

    gcols = ["goal", "target", "measured", "met"]
    ucols = [
        "model",
        "batch",
        "diffusers ms",
        "best diffusers",
        "best ours ms",
        "variant",
        "img/s",
        "MFU %",
        "speedup",
        "err",
    ]
    scols = ["model", "variant", "images", "forward", "ms_per_step", "img_s", "vs_diffusers", "error"]
    lcols = ["server", "point", "img_s", "p50_ms", "p99_ms", "rows_per_fwd", "step_ms", "errors"]

    md = ["# Benchmark run", "", f"`{env_line(env)}`" if env else "(no results found)", ""]
    md += ["## Goals vs measured", "", render_markdown(goals, gcols), ""]
    md += ["## U-Net forward: best of ours vs diffusers", "", render_markdown(compact, ucols), ""]
    for name, doc in docs.items():
        md += [doc_markdown(doc) if doc else f"## bench.{name}\n\nnot run (no {name}.json)\n"]
    (folder / "bench_results.md").write_text("\n".join(md))

    print("\n================ SUMMARY ================")
    print(env_line(env) if env else "no results")
    missing = [n for n, d in docs.items() if d is None]
    if missing:
        print(f"missing results: {', '.join(missing)}")
    print("\n-- goals vs measured --\n" + render_table(goals, gcols))
    print("\n-- U-Net forward (ms per forward; speedup = diffusers eager / best ours) --")
    print(render_table(compact, ucols))
    if sampling:
        print("\n-- sampling loop (20 steps DPM++2M + CFG) --\n" + render_table(sampling, scols))
    if srows:
        print("\n-- server load --\n" + render_table(srows, lcols))
    print(f"\nfull tables: {folder / 'bench_results.md'}")


if __name__ == "__main__":
    main()
