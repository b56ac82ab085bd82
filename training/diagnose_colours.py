"""Why does fashion-text miss some colours? Model or judge — measured on CPU with the shipped weights.

For each asked colour and each prompt form (canonical / training synonyms / held-out colour word in a training
template / the evaluation's held-out prompts / a training colour word in a held-out template) it generates one
sample per class at the model's defaults and reports what the colour judge says it drew (a histogram over the
12 colours), the mean colour feature of the garment, and the judge's centroid of the asked colour (measured
on real images tinted by the training colouriser). A second table shows where MiniLM puts each held-out colour
word: the training colour words nearest to it (cosine of the mean-pooled token states of "a {word} t-shirt",
and of the colour word's own token states in that caption).

    python -m training.diagnose_colours [--colours teal purple white brown] [--per-class 1] [--out X.json]

`--compare-old OLD` measures instead what the wider training vocabulary (issue 5: 10 colour words per colour
instead of 3) changes for a user: the colour words added to training after the v1 weights (`ADDED_WORDS`, 7
per colour), in "a {word} {garment}", drawn by an older fashion-text (`OLD/fashion-text`, for which they were
unseen) and by `--weights` (for which they are training words), each at its own shipped defaults, with the
same seeds and garments; the colour judge's accuracy per word, per colour and overall. `--added xkcd` does
the same for the next step (issue 5: the XKCD colour survey names added to the 10 words per colour,
`captions.xkcd_colour_names`, 238 names): OLD is then a fashion-text trained on the 10 words per colour only,
and a word is grouped by whether it contains one of those 10 words of its colour.

    python -m training.diagnose_colours --compare-old /tmp/old/weights --per-word 5 --out X.json
    python -m training.diagnose_colours --compare-old /tmp/old10/weights --added xkcd --per-word 2 --out Y
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import torch

from training import nets
from training.captions import (
    COLOUR_NAMES,
    COLOUR_WORDS,
    COLOURS,
    GARMENT_WORDS,
    HELDOUT_COLOUR_WORDS,
    HELDOUT_GARMENT_WORDS,
    HELDOUT_TEMPLATES,
    TEMPLATES,
    caption,
    eval_prompt,
    xkcd_colour_names,
)
from training.data import data_dir, load_split
from training.evaluate import ColourJudge, TextContext, colour_features, generate, save_grid

REPO = Path(__file__).resolve().parents[1]
V1_WORDS_PER_COLOUR = 3  # the shipped v1 weights were trained on the first 3 words of each colour
ADDED_WORDS = {c: ws[V1_WORDS_PER_COLOUR:] for c, ws in COLOUR_WORDS.items()}


def at_defaults(unet, sched, meta: dict, seeds: list[int], context: torch.Tensor, uncond: torch.Tensor):
    """``evaluate.generate`` at the model's shipped defaults (``meta``: its unet_server.json defaults)."""
    return generate(
        unet,
        sched,
        meta["sampler"],
        meta["num_inference_steps"],
        meta["guidance_scale"],
        seeds,
        context=context,
        uncond=uncond,
    )


def added_sets(added: str) -> tuple[dict[str, list[str]], dict[str, list[str]], str]:
    """(words added, the old model's training words, group-key stem) per colour for `--added`:
    "v1": the 7 words per colour added after v1 (old: its 3 words); "xkcd": the XKCD names (old: the 10)."""
    if added == "v1":
        return ADDED_WORDS, {c: ws[:V1_WORDS_PER_COLOUR] for c, ws in COLOUR_WORDS.items()}, "v1"
    if added == "xkcd":
        return xkcd_colour_names(), dict(COLOUR_WORDS), "old"
    raise ValueError(f"--added {added!r}: v1 or xkcd")


def _contains_word(words: list[str], word: str) -> bool:
    """Whether `word` contains one of `words` as whole words ("deep red": "red")."""
    return any(re.search(rf"\b{re.escape(w)}\b", word) for w in words)


def hue_degrees(rgb: torch.Tensor) -> torch.Tensor:
    """HSV hue in degrees of colours (N, 3); NaN where the colour is (nearly) gray."""
    mx, mn = rgb.amax(1), rgb.amin(1)
    r, g, b = rgb.unbind(1)
    d = (mx - mn).clamp_min(1e-6)
    h = torch.where(mx == r, ((g - b) / d) % 6, torch.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return torch.where((mx - mn) < 0.1 * mx.clamp_min(1e-6), torch.nan, 60 * h)  # < 10% saturation: gray


def prompt_forms(colour: str, class_id: int) -> dict[str, str]:
    """The prompt forms of one (colour, class); `heldout_eval_*` are the evaluation's odd variants."""
    j = COLOUR_NAMES.index(colour)
    g, hg = GARMENT_WORDS[class_id][0], HELDOUT_GARMENT_WORDS[class_id]
    words = COLOUR_WORDS[colour]
    return {
        "canonical (seen)": eval_prompt(class_id, j, 0),
        "synonym 1 (seen)": caption(TEMPLATES[0], words[1], g),
        "synonym 2 (seen)": caption(TEMPLATES[0], words[2], g),
        "held-out word, seen template": caption(TEMPLATES[0], HELDOUT_COLOUR_WORDS[colour], g),
        "seen word, held-out template": caption(HELDOUT_TEMPLATES[0], words[0], hg),
        "heldout_eval_1": eval_prompt(class_id, j, 1),
        "heldout_eval_3": eval_prompt(class_id, j, 3),
    }


def _pooled(text: TextContext, prompts: list[str]) -> torch.Tensor:
    """Mean-pooled token states over real tokens (sentence-transformers pooling): (B, 384), unit norm."""
    tok = text.encoder.tokenize(prompts)
    mask = tok["attention_mask"].float()[:, :, None]  # (B, L, 1)
    states = text(prompts)  # (B, L, 384)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=1)


def _word_states(text: TextContext, template: str, word: str) -> torch.Tensor:
    """Mean token state of `word`'s pieces in the caption (template, word, "t-shirt"): (384,), unit norm."""
    prompt = caption(template, word, "t-shirt")
    pieces = text.encoder.tokenizer.tokenize(prompt)
    wp = text.encoder.tokenizer.tokenize(word)
    start = next(i for i in range(len(pieces)) if pieces[i : i + len(wp)] == wp) + 1  # +1: [CLS]
    states = text([prompt])[0]  # (L, 384)
    return torch.nn.functional.normalize(states[start : start + len(wp)].mean(0), dim=0)


def text_neighbours(text: TextContext, top: int = 3) -> dict[str, dict]:
    """Each held-out colour word's nearest training colour words, by pooled and by word-token cosine."""
    train = [(name, w) for name in COLOUR_NAMES for w in COLOUR_WORDS[name]]
    tp = TEMPLATES[0]
    pooled_train = _pooled(text, [caption(tp, w, "t-shirt") for _, w in train])  # (W, 384)
    word_train = torch.stack([_word_states(text, tp, w) for _, w in train])  # (W, 384)
    out = {}
    for name, hw in HELDOUT_COLOUR_WORDS.items():
        p = _pooled(text, [caption(tp, hw, "t-shirt")])[0]
        w = _word_states(text, tp, hw)
        row = {}
        for key, sims in (("pooled", pooled_train @ p), ("word_tokens", word_train @ w)):
            order = sims.argsort(descending=True)[:top]
            row[key] = [(train[i][1], train[i][0], round(float(sims[i]), 3)) for i in order]
        row["word_pieces"] = text.encoder.tokenizer.tokenize(hw)
        out[f"{hw} ({name})"] = row
    return out


def _load_text_model(weights: Path) -> tuple[torch.nn.Module, dict, dict, str]:
    """(unet, scheduler config, shipped defaults, train.json sha256) of `weights/fashion-text`."""
    folder = weights / "fashion-text"
    meta = json.loads((folder / "unet_server.json").read_text())["defaults"]
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sha = hashlib.sha256((folder / "train.json").read_bytes()).hexdigest()
    return nets.load(folder / "unet", "unet"), sched, meta, sha


def _eval_summary(weights: Path) -> dict | None:
    """The GPU evaluation's headline colour numbers of `weights/fashion-text` (its eval.json)."""
    path = weights / "fashion-text" / "eval.json"
    if not path.exists():
        return None
    f = json.loads(path.read_text())["final"]
    keys = ("sampler", "steps", "guidance", "n", "colour_accuracy", "colour_accuracy_heldout_prompts")
    return {**{k: f[k] for k in keys}, "per_colour_accuracy": f["per_colour_accuracy"]}


def _accuracy(correct: int, n: int) -> dict:
    p = correct / n
    return {"n": n, "correct": correct, "accuracy": p, "se": (p * (1 - p) / n) ** 0.5}


def compare_added_words(
    old: Path, new: Path, per_word: int, judge: ColourJudge, text: TextContext, added: str = "v1"
) -> dict:
    """Colour accuracy of the old and the new fashion-text on the colour words added since the old model
    (`added_sets(added)`: since v1, ADDED_WORDS; or the XKCD names).

    Word i of a colour gets `per_word` samples, garments cycling through the 10 classes (class
    (i * per_word + s) % 10, its first garment word); seeds are shared by the two models.
    """
    added_words, old_words, stem = added_sets(added)
    has_key, no_key = f"contains_{stem}_word", f"no_{stem}_word"
    models = {"old": _load_text_model(old), "new": _load_text_model(new)}
    prompts, colours, words, seeds = [], [], [], []
    for j, colour in enumerate(COLOUR_NAMES):
        for i, word in enumerate(added_words[colour]):
            for s in range(per_word):
                k = (i * per_word + s) % 10
                prompts.append(caption(TEMPLATES[0], word, GARMENT_WORDS[k][0]))
                colours.append(j)
                words.append(word)
                seeds.append(2_000_000 + 1000 * j + 10 * i + s)
    target = torch.tensor(colours)
    context = text(prompts)
    result: dict = {
        "added": added,
        "prompt": "a {word} {garment}",
        "per_word": per_word,
        "models": {},
    }
    for key, (unet, sched, meta, sha) in models.items():
        t0 = time.monotonic()
        imgs = at_defaults(unet, sched, meta, seeds, context, text.uncond)
        pred = judge(imgs)
        ok = pred == target
        per_word_rows = {}
        for j, colour in enumerate(COLOUR_NAMES):
            for word in added_words[colour]:
                sel = [i for i, w in enumerate(words) if w == word and colours[i] == j]
                hist = Counter(COLOUR_NAMES[int(pred[i])] for i in sel)
                per_word_rows[word] = {
                    "colour": colour,
                    has_key: _contains_word(old_words[colour], word),
                    **_accuracy(int(ok[sel].sum()), len(sel)),
                    "judged_as": dict(hist.most_common()),
                }
        per_colour = {
            c: _accuracy(int(ok[target == j].sum()), int((target == j).sum()))
            for j, c in enumerate(COLOUR_NAMES)
        }
        groups = {}
        for flag, name in ((True, has_key), (False, no_key)):
            sel = [
                i
                for i, w in enumerate(words)
                if _contains_word(old_words[COLOUR_NAMES[colours[i]]], w) == flag
            ]
            groups[name] = _accuracy(int(ok[sel].sum()), len(sel))
        result["models"][key] = {
            "weights": str(old if key == "old" else new),
            "train_json_sha256": sha,
            "defaults": meta,
            "gpu_eval": _eval_summary(old if key == "old" else new),
            "overall": _accuracy(int(ok.sum()), len(ok)),
            "groups": groups,
            "per_colour": per_colour,
            "per_word": per_word_rows,
            "seconds": time.monotonic() - t0,
        }
        print(
            f"{key}: {meta['sampler']} {meta['num_inference_steps']} steps g {meta['guidance_scale']}: "
            f"overall {ok.float().mean():.1%} (n={len(ok)}); "
            + ", ".join(f"{c} {v['accuracy']:.0%}" for c, v in per_colour.items()),
            flush=True,
        )
    print(f"word                  colour     {stem}?   old          new")
    for word, row in result["models"]["new"]["per_word"].items():
        o = result["models"]["old"]["per_word"][word]
        old_cell = f"{o['correct']}/{o['n']} {o['judged_as']}"
        print(
            f"{word:20s}  {row['colour']:9s}  {'yes' if row[has_key] else 'no ':4s}  "
            f"{old_cell:52s}  {row['correct']}/{row['n']} {row['judged_as']}"
        )
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=str(REPO / "weights"))
    ap.add_argument("--colours", nargs="+", default=["teal", "purple", "white", "brown"])
    ap.add_argument("--per-class", type=int, default=1, help="samples per (colour, prompt form, class)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--grid", default=None, help="write a PNG here: one row per (colour, prompt form)")
    ap.add_argument(
        "--compare-old",
        default=None,
        help="instead of the diagnosis: a folder holding an older fashion-text/ (e.g. the v1 weights from "
        "git history); compare it with --weights on the colour words added to training since v1",
    )
    ap.add_argument("--per-word", type=int, default=5, help="--compare-old: samples per added colour word")
    ap.add_argument(
        "--added",
        choices=("v1", "xkcd"),
        default="v1",
        help="--compare-old: which added words: the 7 per colour added since v1 (OLD: v1), or the XKCD names "
        "added to the 10 words per colour (OLD: a 10-word fashion-text)",
    )
    cfg = ap.parse_args(argv)
    torch.manual_seed(0)
    weights = Path(cfg.weights)
    t0 = time.monotonic()
    if cfg.compare_old:
        gray, _ = load_split("train", directory=data_dir(), limit=12000)
        judge = ColourJudge(torch.from_numpy(gray).unsqueeze(1).float() / 255)  # as in the diagnosis
        result = compare_added_words(
            Path(cfg.compare_old), weights, cfg.per_word, judge, TextContext(torch.device("cpu")), cfg.added
        )
        result["seconds"] = time.monotonic() - t0
        if cfg.out:
            Path(cfg.out).write_text(json.dumps(result, indent=1))
        print(f"done in {result['seconds']:.0f}s")
        return
    meta = json.loads((weights / "fashion-text" / "unet_server.json").read_text())["defaults"]
    sched = json.loads((weights / "fashion-text" / "scheduler" / "scheduler_config.json").read_text())
    unet = nets.load(weights / "fashion-text" / "unet", "unet")
    gray, _ = load_split("train", directory=data_dir(), limit=12000)
    judge = ColourJudge(torch.from_numpy(gray).unsqueeze(1).float() / 255)  # as evaluate.Judges builds it
    text = TextContext(torch.device("cpu"))
    result: dict = {
        "defaults": meta,
        # which weights this describes: package.py uses the diagnosis only for the fashion-text it measured
        "train_json_sha256": hashlib.sha256(
            (weights / "fashion-text" / "train.json").read_bytes()
        ).hexdigest(),
        "judge_centroids": {
            c: [round(float(v), 3) for v in judge.centroids[j]] for j, c in enumerate(COLOUR_NAMES)
        },
        "asked_hue_deg": {
            c: round(float(hue_degrees(torch.tensor([rgb]))[0]), 1) for c, rgb in COLOURS.items()
        },
        "cells": {},
    }
    rows = []
    print(f"defaults {meta['sampler']} {meta['num_inference_steps']} steps guidance {meta['guidance_scale']}")
    print("judge centroid (r/max, g/max, b/max, max) of real tinted images:")
    for c in cfg.colours:
        print(f"  {c:10s} {result['judge_centroids'][c]}  hue {result['asked_hue_deg'][c]}")
    for colour in cfg.colours:
        j = COLOUR_NAMES.index(colour)
        forms = list(prompt_forms(colour, 0))
        for f_i, form in enumerate(forms):
            classes = [k for k in range(10) for _ in range(cfg.per_class)]
            prompts = [prompt_forms(colour, k)[form] for k in classes]
            seeds = [1_000_000 + 1000 * j + 100 * f_i + i for i in range(len(prompts))]
            imgs = at_defaults(unet, sched, meta, seeds, text(prompts), text.uncond)
            rows.append(imgs)
            pred = judge(imgs)
            feats = colour_features(imgs)  # (N, 4): rgb / max, max
            hue = hue_degrees(feats[:, :3]).nanmedian()
            feats = feats.mean(0)
            hist = Counter(COLOUR_NAMES[int(p)] for p in pred)
            acc = float((pred == j).float().mean())
            per_class = {k: COLOUR_NAMES[int(p)] for k, p in zip(classes, pred, strict=True) if int(p) != j}
            result["cells"][f"{colour} | {form}"] = {
                "example": prompts[0],
                "n": len(prompts),
                "accuracy": acc,
                "judged_as": dict(hist.most_common()),
                "wrong_by_class": per_class,
                "mean_feature": [round(float(v), 3) for v in feats],
                "median_hue_deg": round(float(hue), 1),
            }
            print(
                f"{colour:7s} {form:30s} acc {acc:4.0%} n={len(prompts)}  judged {dict(hist.most_common())}  "
                f"feature {[round(float(v), 2) for v in feats]} hue {float(hue):.0f}  e.g. '{prompts[0]}'",
                flush=True,
            )
    if cfg.grid:
        save_grid(torch.cat(rows), len(rows), Path(cfg.grid))
    result["text_neighbours"] = text_neighbours(text)
    print("held-out colour word -> nearest training colour words (cosine), pooled | colour-word tokens:")
    for k, row in result["text_neighbours"].items():
        print(f"  {k:28s} {row['word_pieces']}  pooled {row['pooled']}  tokens {row['word_tokens']}")
    result["seconds"] = time.monotonic() - t0
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=1))
    print(f"done in {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
