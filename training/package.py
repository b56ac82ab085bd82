"""Turn a training run into the shipped folders: diffusers layout + unet_server.json + model card + eval.

    python -m training.package --run runs/x --out runs/x/weights

Writes <out>/{fashion-class, fashion-text, fashion-text-edges, fashion-classifier}/ and <out>/README.md. Every
number in the cards and the table comes from the run's train.json / eval.json files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from training.captions import CLASS_NAMES, COLOUR_NAMES, HELDOUT_COLOUR_WORDS, HELDOUT_TEMPLATES
from training.evaluate import GOALS
from training.loop import log, write_json
from training.nets import CLASS_SCHEDULER, TEXT_SCHEDULER

DIFFUSERS_VERSION = "0.42.1"
FALLBACK_DEFAULTS = {
    "fashion-class": {"sampler": "dpmpp_2m", "steps": 20, "guidance": 1.5},
    "fashion-text": {"sampler": "flow_euler", "steps": 20, "guidance": 3.0},
}
SCRIPTS = {
    "fashion-class": "train_class",
    "fashion-text": "train_text",
    "fashion-text-edges": "train_controlnet",
}
TEXT_ENCODER = {"name": "all-MiniLM-L6-v2", "max_length": 24}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def _defaults(name: str, ev: dict | None, base_ev: dict | None = None) -> dict:
    src = (
        (ev or {}).get("default")
        or (base_ev or {}).get("default")
        or FALLBACK_DEFAULTS.get(name, FALLBACK_DEFAULTS["fashion-text"])
    )
    return {
        "sampler": src["sampler"],
        "num_inference_steps": int(src["steps"]),
        "guidance_scale": float(src["guidance"]),
        "width": 32,
        "height": 32,
    }


def _recipe_lines(tr: dict) -> list[str]:
    lines = [
        f"- parameters: {tr.get('num_params', 0) / 1e6:.2f}M; implementation: `{tr.get('backend')}`",
        f"- objective: "
        f"{tr.get('objective', 'as the base model (flow, velocity), ControlNet trained, base frozen')}",
        f"- optimiser: AdamW (fused) lr {tr['lr']}, betas (0.9, 0.99), no weight decay, "
        f"{tr['warmup_steps']} warm-up "
        f"steps then constant; grad-norm clip 1.0; bf16 autocast; EMA {tr['ema_decay']} (weights "
        f"shipped: EMA, fp16)",
        f"- batch {tr['batch']}, {tr['steps']} steps = {tr['images_seen']:,} images "
        f"({tr['images_seen'] / 60000:.0f} epochs of the 60k training split); condition dropout "
        f"{tr.get('cond_drop')}",
        f"- time: {tr['seconds_training']:.0f} s of training ({tr['seconds_total']:.0f} s incl. compile) on "
        f"{tr['device']}, {tr['steps_per_s']:.1f} steps/s = {tr['images_per_s']:.0f} images/s "
        f"(torch.compile: {tr['compiled']}; torch {tr['torch']}; shared the GPU with a second training "
        f"process)",
        f"- final training loss (mean of the last log interval): "
        f"{_num(tr.get('final_loss'), '{:.4f}')}; seed {tr['seed']}",
    ]
    return lines


def _sweep_table(ev: dict, keys: list[tuple[str, str, str]]) -> list[str]:
    head = "| sampler | steps | guidance | " + " | ".join(k[1] for k in keys) + " |"
    out = [head, "|" + "---|" * (3 + len(keys))]
    for r in ev.get("sweep", []):
        vals = [(_pct(r.get(k)) if kind == "pct" else _num(r.get(k))) for k, _, kind in keys]
        out.append(f"| {r['sampler']} | {r['steps']} | {r['guidance']} | " + " | ".join(vals) + " |")
    return out


def card(name: str, tr: dict | None, ev: dict | None, meta: dict) -> str:
    d = meta["defaults"]
    lines = [f"# {name}", ""]
    if name == "fashion-class":
        lines += [
            "Class-conditional pixel U-Net (diffusers `UNet2DModel` layout), 32×32 grayscale Fashion-MNIST, "
            "10 classes + a null row (label 10) for classifier-free guidance. VP cosine schedule "
            "(squaredcos_cap_v2), v-prediction.",
            "",
        ]
    elif name == "fashion-text":
        lines += [
            "Text-conditional pixel U-Net (diffusers `UNet2DConditionModel` layout), 32×32 RGB, "
            "cross-attention "
            "to the 24 token states of all-MiniLM-L6-v2 (frozen). Rectified flow, velocity prediction. "
            "Trained on colourised Fashion-MNIST with templated captions.",
            "",
        ]
    else:
        lines += [
            "ControlNet (diffusers `ControlNetModel` layout) for `fashion-text` on 1-channel edge maps "
            "(white edges on black, [0, 1]): a drawn outline steers the garment's shape. Uses the base "
            "model's U-Net and scheduler (`base_model: fashion-text`).",
            "",
        ]
    lines += [
        "## Data",
        "",
        "Fashion-MNIST (Debian `dataset-fashion-mnist`): the 60,000-image training split only; 28×28 "
        "padded to "
        "32×32, scaled to [-1, 1]. The 10,000-image test split is used only by the evaluation.",
    ]
    if name != "fashion-class":
        lines += [
            "",
            f"Colourising: each garment is scaled so its brightest pixel is 1 and multiplied by one of "
            f"{len(COLOUR_NAMES)} colours ({', '.join(COLOUR_NAMES)}), drawn per sample per step. Captions: "
            "6 templates × 3 colour words × 3 garment words per (class, colour) = 6,480 captions "
            '(e.g. "a crimson trainer", "a navy coloured jumper"); 10% replaced by the empty prompt. '
            f"Held out from training: the colour words {', '.join(HELDOUT_COLOUR_WORDS.values())}; their own "
            f"garment words; the templates {', '.join(repr(t) for t in HELDOUT_TEMPLATES)}.",
        ]
    if name == "fashion-text-edges":
        lines += [
            "",
            "Control maps: thin edges (Sobel gradient of the colour-free garment intensity, non-maximum "
            "suppression, threshold 0.25; `training.data.edges`).",
        ]
    lines += ["", "## Recipe", ""]
    lines += _recipe_lines(tr) if tr else ["(no training record)"]
    lines += ["", "## Evaluation", ""]
    if not ev:
        lines += ["Not evaluated (the evaluation did not produce results for this model)."]
    else:
        f, ref = ev["final"], ev["reference"]
        lines += [
            f"Judge: an independent CNN (`weights/fashion-classifier`) trained on the real training split: "
            f"{_pct(ref['classifier_test_accuracy_gray'])} on the real test set, "
            f"{_pct(ref['classifier_test_accuracy_tinted'])} on colourised test images. Colour judge: "
            f"{_pct(ref['colour_judge_accuracy_real_tinted'])} on real colourised test images. "
            f"Evaluated on {ev.get('gpu') or ev['device']}.",
            "",
            f"Default chosen by the evaluation: **{d['sampler']}, {d['num_inference_steps']} steps, guidance "
            f"{d['guidance_scale']}**. Rule: {ev['selection_rule']}.",
            "",
            "| metric | value | goal |",
            "|---|---|---|",
        ]
        goals = GOALS[name]
        rows = [
            ("class_accuracy", "class accuracy (judge)"),
            ("colour_accuracy", "colour accuracy"),
            ("class_accuracy_heldout_prompts", "class accuracy, held-out prompts"),
            ("colour_accuracy_heldout_prompts", "colour accuracy, held-out prompts"),
            ("edge_f1", "edge F1 (1-px tolerance)"),
            ("edge_f1_without_control", "edge F1 without control"),
        ]
        for k, label in rows:
            if k in f:
                goal = (
                    f"≥ {goals[k]:.2f}"
                    if k in goals and k == "edge_f1"
                    else (f"≥ {100 * goals[k]:.0f}%" if k in goals else "")
                )
                val = _num(f[k], "{:.3f}") if k.startswith("edge") else _pct(f[k])
                lines.append(f"| {label} | {val} | {goal} |")
        lines.append(
            f"| Fréchet distance (judge features) | {_num(f.get('fd'))} | reference real train vs test: "
            f"{_num(f.get('fd_reference_real_train_vs_test'))} |"
        )
        lines.append(f"| samples | {f['n']} | |")
        if "per_class_accuracy" in f:
            lines += [
                "",
                "Per class: " + ", ".join(f"{k} {_pct(v)}" for k, v in f["per_class_accuracy"].items()),
            ]
        if "per_colour_accuracy" in f:
            lines += [
                "",
                "Per colour: " + ", ".join(f"{k} {_pct(v)}" for k, v in f["per_colour_accuracy"].items()),
            ]
        if ev.get("sweep"):
            keys = (
                [("class_accuracy", "class acc", "pct"), ("fd", "FD", "num")]
                if name == "fashion-class"
                else [
                    ("class_accuracy", "class acc", "pct"),
                    ("colour_accuracy", "colour acc", "pct"),
                    ("colour_accuracy_heldout_prompts", "colour acc (held-out)", "pct"),
                    ("fd", "FD", "num"),
                ]
            )
            lines += ["", "Sweep (selection run; the table above is a separate run with fresh seeds):", ""]
            lines += _sweep_table(ev, keys)
        lines += [
            "",
            "`grid.png`: "
            + {
                "fashion-class": "one row per class (T-shirt/top … Ankle boot), 10 samples each, "
                "default settings.",
                "fashion-text": "one row per colour (in the order above), one column per class, "
                "canonical prompts "
                '("a red t-shirt"), default settings.',
                "fashion-text-edges": "one row per control map (first column: the map), then 6 colours "
                "with control.",
            }[name],
        ]
    lines += [
        "",
        "## Reproduce",
        "",
        "`bash training/run_all.sh` (see `training/README.md`); this model: "
        f"`python -m training.{SCRIPTS[name]}"
        f"{' --steps ' + str(tr['steps']) if tr else ''}`. Seeded; the data order is fixed by the seed.",
        "",
    ]
    return "\n".join(lines)


def package(run: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    evs = {}
    for name, kind in (("fashion-class", "class"), ("fashion-text", "text"), ("fashion-text-edges", "text")):
        src = run / name
        tr, ev = _read(src / "train.json"), _read(src / "eval.json")
        evs[name] = (tr, ev)
        if tr is None:
            log(f"package: {name} has no train.json; skipped")
            continue
        dst = out / name
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        control = name == "fashion-text-edges"
        meta = {
            "kind": kind,
            "base_model": "fashion-text" if control else None,
            "class_names": CLASS_NAMES if kind == "class" else None,
            "null_class_label": 10 if kind == "class" else None,
            "text_encoder": TEXT_ENCODER if kind == "text" else None,
            "control": {"type": "edges", "channels": 1} if control else None,
            "image_channels": 1 if kind == "class" else 3,
            "sample_size": 32,
            "defaults": _defaults(name, ev, evs.get("fashion-text", (None, None))[1] if control else None),
        }
        if kind == "text":
            meta["colours"] = COLOUR_NAMES
        if control:
            shutil.copytree(src / "controlnet", dst / "controlnet")
            index = {
                "_class_name": "ControlNetModel",
                "_diffusers_version": DIFFUSERS_VERSION,
                "controlnet": ["diffusers", "ControlNetModel"],
                "base_model": "fashion-text",
            }
        else:
            shutil.copytree(src / "unet", dst / "unet")
            sched = CLASS_SCHEDULER if kind == "class" else TEXT_SCHEDULER
            write_json(
                dst / "scheduler" / "scheduler_config.json",
                {**sched, "_diffusers_version": DIFFUSERS_VERSION},
            )
            index = {
                "_class_name": "DDIMPipeline" if kind == "class" else "UNetServerTextPipeline",
                "_diffusers_version": DIFFUSERS_VERSION,
                "unet": ["diffusers", "UNet2DModel" if kind == "class" else "UNet2DConditionModel"],
                "scheduler": ["diffusers", sched["_class_name"]],
            }
        write_json(dst / "model_index.json", index)
        write_json(dst / "unet_server.json", meta)
        tr_small = {k: v for k, v in tr.items() if k != "history"}
        hist = tr.get("history", [])
        tr_small["loss_log"] = [[h["step"], round(h["loss"], 5)] for h in hist[:: max(1, len(hist) // 40)]]
        write_json(dst / "train.json", tr_small)
        if ev:
            write_json(dst / "eval.json", ev)
        if (src / "grid.png").exists():
            shutil.copy(src / "grid.png", dst / "grid.png")
        (dst / "README.md").write_text(card(name, tr, ev, meta))
    cdir = run / "classifier"
    if (cdir / "model.safetensors").exists():
        dst = out / "fashion-classifier"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(cdir, dst)
        info = _read(cdir / "config.json") or {}
        ref = next((ev["reference"] for _, ev in evs.values() if ev), None)
        (dst / "README.md").write_text(
            "\n".join(
                [
                    "# fashion-classifier",
                    "",
                    "The independent judge of the evaluation (`training/classifier.py`): a 5-conv CNN "
                    "trained on the real "
                    "Fashion-MNIST training split only, on the colour-free view (max over channels, "
                    "per-image max "
                    "scaled). Its 128-d penultimate features are the space of the Fréchet distances. "
                    "Not a served model.",
                    "",
                    f"- {info.get('num_params', 0):,} parameters, {info.get('steps')} steps of batch "
                    f"{info.get('batch')}, "
                    f"{_num(info.get('seconds'), '{:.0f}')} s, seed {info.get('seed')}",
                    f"- test accuracy: {_pct(info.get('test_accuracy_gray'))} (gray)"
                    + (
                        f", {_pct(ref['classifier_test_accuracy_tinted'])} (colourised test images)"
                        if ref
                        else ""
                    ),
                    "",
                ]
            )
        )
    write_readme(out, evs)


def write_readme(out: Path, evs: dict) -> None:
    lines = [
        "# Shipped weights",
        "",
        "Small models trained on Fashion-MNIST by `training/run_all.sh` on one GPU. Every number below is "
        "written by `training/package.py` from the run's eval.json files (`training/evaluate.py`); "
        "details, sweeps and grids are in each folder's README.md.",
        "",
        "| model | default sampler | steps | guidance | class acc | colour acc (all / held-out prompts) | "
        "edge F1 (vs no control) | FD (ref real) | goals met | training |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (tr, ev) in evs.items():
        if tr is None:
            lines.append(f"| {name} | not trained | | | | | | | | |")
            continue
        if not ev:
            lines.append(f"| {name} | not evaluated | | | | | | | | {tr['steps']} steps |")
            continue
        f = ev["final"]
        d = ev["default"]
        colour = (
            f"{_pct(f.get('colour_accuracy'))} / {_pct(f.get('colour_accuracy_heldout_prompts'))}"
            if "colour_accuracy" in f
            else "—"
        )
        edge = (
            f"{_num(f.get('edge_f1'), '{:.3f}')} ({_num(f.get('edge_f1_without_control'), '{:.3f}')})"
            if ("edge_f1" in f)
            else "—"
        )
        met = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in ev["goals_met"].items())
        lines.append(
            f"| {name} | {d['sampler']} | {d['steps']} | {d['guidance']} | {_pct(f.get('class_accuracy'))} "
            f"| {colour} | {edge} | {_num(f.get('fd'))} ({_num(f.get('fd_reference_real_train_vs_test'))}) "
            f"| {met} | {tr['steps']} steps, {tr['seconds_training']:.0f} s, {tr['device']} |"
        )
    ref = next((ev["reference"] for _, ev in evs.values() if ev), None)
    if ref:
        lines += [
            "",
            f"Judge: {_pct(ref['classifier_test_accuracy_gray'])} test accuracy on real images, "
            f"{_pct(ref['classifier_test_accuracy_tinted'])} on colourised test images; colour judge "
            f"{_pct(ref['colour_judge_accuracy_real_tinted'])} on real colourised test images. Goals: "
            + "; ".join(f"{n}: " + ", ".join(f"{k} ≥ {v}" for k, v in g.items()) for n, g in GOALS.items())
            + ".",
        ]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    package(Path(args.run), Path(args.out))
    log(f"packaged into {args.out}")


if __name__ == "__main__":
    main()
