"""Turn a training run into the shipped folders: diffusers layout + unet_server.json + model card + eval.

    python -m training.package --run runs/x --out runs/x/weights     # a run -> shipped folders + cards
    python -m training.package --cards weights                       # rewrite the cards of shipped folders

Writes <out>/{fashion-class, fashion-text, fashion-text-edges, fashion-classifier}/ and <out>/README.md. Every
number in the cards and the table comes from the run's train.json / eval.json files (and, for the shipped
folders, `training/colour_diagnosis.json` and `training/colour_vocab_effect.json`, both written by
`training/diagnose_colours.py`). `--cards` also adds `training/shipped_run.json`: what happened during the
runs that made the shipped weights, in words.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

from training.captions import (
    CLASS_NAMES,
    COLOUR_NAMES,
    COLOUR_WORDS,
    HELDOUT_COLOUR_WORDS,
    HELDOUT_TEMPLATES,
)
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
HERE = Path(__file__).resolve().parent
NOTES = HERE / "shipped_run.json"  # provenance of the shipped weights' run, in words (no numbers)
DIAGNOSIS = HERE / "colour_diagnosis.json"  # `python -m training.diagnose_colours --out ...` on weights/
# `python -m training.diagnose_colours --compare-old <v1 weights> --out ...`: the colour words added since v1,
# v1 (3 words per colour) vs the 10-word weights of commit 4b9de4e (the 3 -> 10-word step)
VOCAB_EFFECT = HERE / "colour_vocab_effect.json"
# `... --compare-old <10-word weights> --added xkcd --out ...`: the XKCD names, 10-word weights vs the shipped
VOCAB_EFFECT_XKCD = HERE / "colour_vocab_effect_xkcd.json"
MODELS = ("fashion-class", "fashion-text", "fashion-text-edges", "fashion-classifier")
# The caption vocabulary of runs whose train.json has no "captions" record (`captions.caption_summary`): the
# shipped v1 weights, trained with 3 colour words per colour.
V1_CAPTIONS = {
    "num_captions": 6480,
    "templates": 6,
    "colour_words_per_colour": 3,
    "garment_words_per_class": 3,
}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _captions(tr: dict | None) -> dict:
    """The caption vocabulary a text model was trained with (its train.json, else the v1 vocabulary)."""
    return (tr or {}).get("captions") or V1_CAPTIONS


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def diagnosis_for(folder: Path, diagnosis: dict | None) -> dict | None:
    """`diagnosis` if it was measured on these fashion-text weights (same train.json), else None.

    The diagnosis and its prose describe one set of weights; after a retrain it is left out of the cards
    until `training.diagnose_colours` is rerun on the new weights.
    """
    if not diagnosis:
        return None
    if diagnosis.get("train_json_sha256") != _sha256(folder / "fashion-text" / "train.json"):
        log(f"package: {DIAGNOSIS.name} was measured on other fashion-text weights; left out of the cards")
        return None
    return diagnosis


def vocab_effect_for(folder: Path, effect: dict | None) -> dict | None:
    """`effect` (colour_vocab_effect*.json) if its new model is these fashion-text weights, else None."""
    if not effect:
        return None
    if effect["models"]["new"].get("train_json_sha256") != _sha256(folder / "fashion-text" / "train.json"):
        log(f"package: {VOCAB_EFFECT.name} was measured on other fashion-text weights; left out of the cards")
        return None
    return effect


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def _pct_se(p: float | None, n: int | None) -> str:
    """'96.8% ± 0.7' : the binomial standard error sqrt(p(1-p)/n), in points."""
    if p is None or not n:
        return _pct(p)
    return f"{_pct(p)} ± {100 * math.sqrt(p * (1 - p) / n):.1f}"


def load_notes(path: Path | None = NOTES) -> dict:
    return (_read(path) or {}) if path else {}


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
        f"- GPU time: {tr['seconds_total']:.0f} s on one {tr['device']} = {tr['seconds_training']:.0f} s "
        f"of training steps + {tr['seconds_total'] - tr['seconds_training']:.0f} s of torch.compile and "
        "start-up; "
        f"{tr['steps_per_s']:.1f} steps/s = {tr['images_per_s']:.0f} images/s (torch.compile: "
        f"{tr['compiled']}; torch {tr['torch']}; "
        + (
            "shared the GPU with a second training process)"
            if tr.get("gpu_shared", True)
            else "the only training process on the GPU)"
        ),
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


def _row_of(sweep: list[dict], d: dict) -> dict | None:
    return next(
        (r for r in sweep if r["sampler"] == d["sampler"] and r["guidance"] == d["guidance_scale"]), None
    )


def _tradeoff(name: str, ev: dict) -> list[str]:
    """A paragraph on what the selection rule trades away, from the sweep (class model only)."""
    sweep, goals = ev.get("sweep") or [], GOALS[name]
    if name != "fashion-class" or not sweep:
        return []
    d = {"sampler": ev["default"]["sampler"], "guidance_scale": ev["default"]["guidance"]}
    chosen = _row_of(sweep, d)
    meets = [r for r in sweep if all(r.get(k, 0) >= v for k, v in goals.items())]
    same = sorted((r for r in meets if r["sampler"] == d["sampler"]), key=lambda r: r["guidance"])
    if not chosen or not same:
        return []
    n = chosen["n"]
    listing = ", ".join(f"g={r['guidance']}: {_pct(r['class_accuracy'])} / FD {_num(r['fd'])}" for r in same)
    lower = [r for r in same if r["guidance"] < chosen["guidance"]]
    return [
        "Trade-off: the rule puts class accuracy first (with a 0.5-point tolerance), so once accuracy is "
        f"near 100% it ignores FD. {d['sampler']} in the sweep (n = {n} each; the standard error of an "
        f"accuracy near {_pct(chosen['class_accuracy'])} is "
        f"{_pct_se(chosen['class_accuracy'], n).split('± ')[1]} points): {listing}. "
        + (
            "The default stays what the rule chose — the rule was written before the run, and only the "
            "default has a confirmation run on fresh seeds — but "
            + " and ".join(f"g={r['guidance']}" for r in lower)
            + " also meet the goal with a lower FD (closer to the real images' feature distribution, i.e. "
            "more varied samples); pass `guidance_scale` per request for that. A rule that picks the lowest "
            "FD among settings above the goal by a margin would be the better trade-off for a served "
            "default; fixing it before the next run is the honest way to change it."
            if lower
            else ""
        ),
        "",
    ]


def _diagnosis_lines(diag: dict) -> list[str]:
    """The colour diagnosis (training/diagnose_colours.py) as a table plus the text encoder's neighbours."""
    meta = diag["defaults"]
    cells = diag["cells"]
    n = next(iter(cells.values()))["n"]
    lines = [
        f"Diagnosis (`python -m training.diagnose_colours`, CPU, shipped weights, {meta['sampler']} "
        f"{meta['num_inference_steps']} steps, guidance {meta['guidance_scale']}; {n} samples per row, one "
        "per class): the colour judge's verdicts, and the median hue of the garment's brightest pixels over "
        "the samples that are not gray, next to the asked colour's hue (— : gray or white, no hue).",
        "",
        "| asked | prompt form | example | judged right | judged as | hue (asked) |",
        "|---|---|---|---|---|---|",
    ]
    for key, c in cells.items():
        colour, form = key.split(" | ")
        judged = ", ".join(f"{k} {v}" for k, v in c["judged_as"].items())
        hue = "—" if math.isnan(c["median_hue_deg"]) else f"{c['median_hue_deg']:.0f}°"
        asked = diag["asked_hue_deg"][colour]
        asked = "—" if math.isnan(asked) else f"{asked:.0f}°"
        lines.append(
            f"| {colour} | {form} | {c['example']} | {_pct(c['accuracy'])} | {judged} | {hue} ({asked}) |"
        )
    lines += [
        "",
        "Where all-MiniLM-L6-v2 puts the held-out colour words (nearest training colour words by cosine "
        'of the mean-pooled token states of "a {word} t-shirt", and of the colour word\'s own token states):',
        "",
        "| held-out word | word pieces | nearest (pooled) | nearest (word tokens) |",
        "|---|---|---|---|",
    ]
    for word, row in diag["text_neighbours"].items():
        fmt = lambda items: ", ".join(f"{w} ({c}) {sim:.2f}" for w, c, sim in items)  # noqa: E731
        lines.append(
            f"| {word} | {' '.join(row['word_pieces'])} | {fmt(row['pooled'])} | {fmt(row['word_tokens'])} |"
        )
    return lines + [""]


def _limitations(name: str, tr: dict | None, ev: dict | None, diagnosis: dict | None) -> list[str]:
    lines = ["## Known limitations", ""]
    if not ev:
        return lines + ["- Not evaluated.", ""]
    f = ev["final"]
    missed = [k for k, ok in ev["goals_met"].items() if not ok]
    if missed:
        lines.append(
            "- **Goal not met**: "
            + ", ".join(f"{k} {_pct(f[k])} (goal ≥ {_pct(ev['goals'][k])})" for k in missed)
            + "."
        )
    if name == "fashion-class":
        lines += [
            "- 32×32 grayscale, the 10 Fashion-MNIST classes only.",
            f"- FD {_num(f['fd'])} against {_num(f['fd_reference_real_train_vs_test'])} between real "
            "training and test images: at the default guidance the samples are more class-typical and less "
            "varied than real garments (see the trade-off above).",
        ]
    if name in ("fashion-text", "fashion-text-edges"):
        lines += [
            f"- Colour on held-out paraphrases: {_pct(f['colour_accuracy_heldout_prompts'])} against "
            f"{_pct(f['colour_accuracy'])} on all prompts. Only the {len(COLOUR_NAMES)} training colours "
            "exist; a colour word the model never saw is drawn as whatever the frozen text encoder's token "
            "states are closest to (see the diagnosis"
            + (" below)." if name == "fashion-text" else " in `fashion-text/README.md`).")
        ]
    if name == "fashion-text-edges":
        lines.append(
            f"- Class accuracy with control is {_pct(f['class_accuracy'])} (n = {f['n']}), lower than in "
            "fashion-text's own evaluation (a different prompt set); not diagnosed. Maps must look like "
            "`training.data.edges` output (thin "
            "white edges on black, 32×32)."
        )
    lines += [
        "- One training run (seed 0), stopped by a time budget; run-to-run variation is not measured.",
        "",
    ]
    if name == "fashion-text" and diagnosis:
        lines += _why_colours_fail(tr, ev, diagnosis)
    return lines


_HELDOUT_FORMS = ("held-out word, seen template", "heldout_eval_1", "heldout_eval_3")
# How the diagnosed held-out words come out for the weights that colour_diagnosis.json measured (written from
# its verdicts, median hues and mean colour features (r/max, g/max, b/max, max); revise with the diagnosis).
_DRAWN_AS = {
    "aqua": "a bright cyan close to the palette's teal in the seen template; in the held-out templates a "
    "lighter, paler cyan that the judge splits between teal, blue and white",
    "amethyst": "near-white with a faint cool (bluish) tint — no purple at all",
    "chestnut": "a bright red-orange (about as bright as orange, where the palette's brown is dark), redder "
    "than brown's hue",
    "pearl white": "off-white with a cream (yellow) tint",
}


def _contains_own_word(colour: str, word: str) -> bool:
    """Whether a held-out colour word contains one of its own colour's training words ("cherry red")."""
    return any(re.search(rf"\b{re.escape(w)}\b", word) for w in COLOUR_WORDS[colour])


def _heldout_rows(diagnosis: dict) -> dict[str, dict]:
    """Per diagnosed colour: its held-out word's rows (seen template + the evaluation's two) summed."""
    out: dict[str, dict] = {}
    for key, c in diagnosis["cells"].items():
        colour, form = key.split(" | ")
        if form not in _HELDOUT_FORMS:
            continue
        row = out.setdefault(colour, {"n": 0, "right": 0, "judged_as": Counter(), "hues": []})
        row["n"] += c["n"]
        row["right"] += round(c["accuracy"] * c["n"])
        row["judged_as"].update(c["judged_as"])
        if not math.isnan(c["median_hue_deg"]):
            row["hues"].append(c["median_hue_deg"])
    return out


def _hue_range(hues: list[float]) -> str:
    if not hues:
        return "no hue (gray or white)"
    lo, hi = min(hues), max(hues)
    return f"median hue {lo:.0f}°" if round(lo) == round(hi) else f"median hue {lo:.0f}–{hi:.0f}°"


def _why_colours_fail(tr: dict | None, ev: dict, diagnosis: dict) -> list[str]:
    cells = diagnosis["cells"]
    f = ev["final"]
    seen = [
        c["accuracy"] for k, c in cells.items() if "seen" in k.split(" | ")[1] and "held-out word" not in k
    ]
    seen_range = _pct(min(seen)) if min(seen) == max(seen) else f"{_pct(min(seen))}–{_pct(max(seen))}"
    hues = diagnosis["asked_hue_deg"]
    words = []
    for colour, row in _heldout_rows(diagnosis).items():
        word = HELDOUT_COLOUR_WORDS[colour]
        judged = ", ".join(f"{k} {v}" for k, v in row["judged_as"].most_common())
        asked = (
            f"{colour} has no hue" if math.isnan(hues[colour]) else f"against {colour}'s {hues[colour]:.0f}°"
        )
        drawn = f"drawn as {_DRAWN_AS[word]}; " if word in _DRAWN_AS else ""
        words.append(
            f"- '{word}' ({colour}): {drawn}judged {colour} in {row['right']} of {row['n']} "
            f"(judged as: {judged}); {_hue_range(row['hues'])} ({asked})."
        )
    per_colour = f.get("per_colour_accuracy", {})
    own = [c for c in COLOUR_NAMES if _contains_own_word(c, HELDOUT_COLOUR_WORDS[c]) and c in per_colour]
    rest = [c for c in COLOUR_NAMES if c not in own and c in per_colour]
    own_acc = [per_colour[c] for c in own]
    lines = [
        "### Why colours fail — the model, not the judge",
        "",
        "Every prompt form that uses a training colour word is drawn in the asked colour "
        f"({seen_range} in each of the seen-word rows below, including seen colour words in the held-out "
        "templates and garment words), and the colour judge's centroids are measured on images tinted by the "
        "same `data.tint` the training used (it classifies "
        f"{_pct(ev['reference']['colour_judge_accuracy_real_tinted'])} of real tinted test images "
        "correctly). The misses come from held-out colour words that contain no training word of their "
        "colour. The colours whose held-out word does ("
        + ", ".join(f"'{HELDOUT_COLOUR_WORDS[c]}'" for c in own)
        + f") score {_pct(min(own_acc))}–{_pct(max(own_acc))} in the GPU evaluation's per-colour accuracy "
        "above; the others: "
        + ", ".join(f"{c} ('{HELDOUT_COLOUR_WORDS[c]}') {_pct(per_colour[c])}" for c in rest)
        + ". The diagnosed colours' held-out words, over their three held-out-word rows below (the seen "
        "template and the evaluation's two held-out templates):",
        "",
        *words,
        "",
        "In MiniLM's space (table below; nearest among the 10 words per colour only, not the XKCD names) "
        "'aqua' sits next to blue words, with no teal word among its nearest; 'amethyst' is split into word "
        "pieces whose states are near no colour word; 'chestnut' is nearest to words of other colours (by "
        "its own tokens: ruby red, cinnamon brown, leaf green). Against the diagnosis of the 10-word weights "
        "that these replace (`training/colour_diagnosis.json` at commit 22a711c; flow_euler, guidance 2.0; "
        "same rows, n = 30 each): 'aqua' 1/30 → 20/30, 'amethyst' 1/30 → 0/30, 'chestnut' 15/30 → 2/30 "
        "(then ochre, orange and olive; now red-orange), 'pearl white' 28/30 → 30/30. So the XKCD names "
        "helped 'aqua', not 'amethyst', and 'chestnut' got worse. The GPU numbers above are the model's: "
        "the judge has no bug to fix.",
        "",
        *_diagnosis_lines(diagnosis),
    ]
    lines += _vocabulary_effect(tr, ev, diagnosis.get("vocab_effect"), diagnosis.get("vocab_effect_previous"))
    caps = _captions(tr)
    lines += [
        "### What would fix it",
        "",
        "More steps would not: seen prompts are already right, so this is not under-fitting. Conditioning on "
        "MiniLM's pooled sentence embedding would not either — the pooled neighbours above are just as wrong "
        "('aqua' → azure, 'amethyst' → scarlet). More colour names did not close the gap: these weights "
        f"were trained with {caps['colour_words_per_colour']} words per colour"
        + (
            f" plus {caps['xkcd_colour_names']} XKCD colour survey names, each mapped to the nearest of the "
            f"{len(COLOUR_NAMES)} tints"
            if caps.get("xkcd_colour_names")
            else ""
        )
        + "; 'aqua' improved, 'amethyst' and 'chestnut' did not (the diagnosis above). What could: (1) "
        "tinting each name with its own RGB instead of the nearest palette colour, so the model learns a "
        "continuous map from MiniLM's states to colour rather than 12 bins (checked first on CPU with "
        "`training/probe_colour_words.py`); (2) a text encoder that knows colours (e.g. a CLIP text tower) "
        "instead of all-MiniLM-L6-v2, whose similarity space is about topics, not hues. Neither was done for "
        "these weights.",
        "",
    ]
    return lines


def _caption_count(caps: dict) -> str:
    """How the caption count is made: the product per (class, colour), plus the XKCD captions, × pairs."""
    pairs = len(CLASS_NAMES) * len(COLOUR_NAMES)
    base = caps["templates"] * caps["colour_words_per_colour"] * caps["garment_words_per_class"]
    xkcd = caps.get("xkcd_captions_per_pair", 0)
    text = (
        f"{caps['templates']} templates × {caps['colour_words_per_colour']} colour words × "
        f"{caps['garment_words_per_class']} garment words = {base} per (class, colour)"
    )
    if xkcd:
        text += f", plus {xkcd} with XKCD colour names (below) = {base + xkcd}"
    text += f"; × {pairs} (class, colour) pairs = {caps['num_captions']:,} captions"
    if (base + xkcd) * pairs != caps["num_captions"]:
        log(f"package: caption count {caps['num_captions']} is not ({base} + {xkcd}) × {pairs}")
        text += " (as recorded in train.json)"
    return text


def _pct_se_inner(p: float, n: int) -> str:
    """_pct_se, without the ± where p is 0 or 1 (the binomial standard error is 0 there and says nothing)."""
    return _pct(p) if p in (0.0, 1.0) else _pct_se(p, n)


def _verdicts(judged_as: dict[str, int]) -> str:
    return ", ".join(f"{c} {n}" for c, n in judged_as.items())


_EFFECT_LABELS = {
    # effect["added"] -> (old model's label, what was added, group key stem, the old model's words in a group)
    "v1": ("v1", "the colour words added to training since v1", "v1", "a v1 word of their colour"),
    "xkcd": (
        "10-word weights",
        "the XKCD colour names added to training since the 10-word weights",
        "old",
        "one of the 10 words of their colour",
    ),
}


def _effect_labels(effect: dict) -> tuple[str, str, str, str]:
    return _EFFECT_LABELS[effect.get("added", "v1")]


def _previous_effect(previous: dict) -> list[str]:
    """The step before (colour_vocab_effect.json, 3 -> 10 words per colour), in one paragraph."""
    old, new = previous["models"]["old"], previous["models"]["new"]
    oe, ne = old.get("gpu_eval"), new.get("gpu_eval")
    go, gn = old["groups"], new["groups"]
    commit = previous.get("new_weights_commit", "?")
    text = (
        f"The step before (3 → 10 colour words per colour; `training/colour_vocab_effect.json`, measured "
        f"on the 10-word `fashion-text` shipped in commit {commit}, now superseded by these weights, against "
        f"v1): on the {len(new['per_word'])} words added then ({previous['per_word']} samples per word, "
        f"n = {old['overall']['n']} per model) v1 drew {_pct(old['overall']['accuracy'])} in the asked "
        f"colour and the 10-word weights {_pct(new['overall']['accuracy'])}; words containing a v1 word "
        f"of their colour {_pct(go['contains_v1_word']['accuracy'])} → "
        f"{_pct(gn['contains_v1_word']['accuracy'])}"
        f" (n = {go['contains_v1_word']['n']}), the others {_pct(go['no_v1_word']['accuracy'])} → "
        f"{_pct(gn['no_v1_word']['accuracy'])} (n = {go['no_v1_word']['n']})."
    )
    if oe and ne:
        text += (
            " In the GPU evaluations colour accuracy on the held-out prompts went from "
            f"{_pct(oe['colour_accuracy_heldout_prompts'])} to {_pct(ne['colour_accuracy_heldout_prompts'])} "
            f"and on all prompts from {_pct(oe['colour_accuracy'])} to {_pct(ne['colour_accuracy'])} "
            f"(n = {ne['n']} each)."
        )
    return [text, ""]


def _vocabulary_effect(
    tr: dict | None, ev: dict, effect: dict | None, previous: dict | None = None
) -> list[str]:
    """The wider vocabulary, before/after: the GPU evaluations of the old and these weights, and the added
    words drawn by both (`diagnose_colours --compare-old [--added xkcd]` -> colour_vocab_effect*.json);
    `previous`: the comparison one vocabulary step earlier, whose new model is `effect`'s old one."""
    if not effect:
        return []
    old, new = effect["models"]["old"], effect["models"]["new"]
    oe, ne = old.get("gpu_eval"), new.get("gpu_eval")
    caps = _captions(tr)
    label, added_desc, stem, group_desc = _effect_labels(effect)
    has_key, no_key = f"contains_{stem}_word", f"no_{stem}_word"
    per_word = effect["per_word"]
    n_added = len(new["per_word"])
    commit = effect.get("old_weights_commit")
    vocab = f"{caps['colour_words_per_colour']} colour words per colour" + (
        f" plus {caps['xkcd_colour_names']} XKCD colour names" if caps.get("xkcd_colour_names") else ""
    )
    lines = [
        "### The wider vocabulary: what it changed",
        "",
        f"These weights were trained with {vocab}; the {label}"
        + (f" (shipped in commit {commit})" if commit else "")
        + (
            f" with {V1_CAPTIONS['colour_words_per_colour']} words per colour."
            if effect.get("added", "v1") == "v1"
            else " with the 10 words per colour only."
        ),
    ]
    if oe and ne:
        changed = [
            c for c in COLOUR_NAMES if abs(oe["per_colour_accuracy"][c] - ne["per_colour_accuracy"][c]) > 1e-6
        ]
        diff = ne["colour_accuracy"] - oe["colour_accuracy"]
        se = math.sqrt(sum(e["colour_accuracy"] * (1 - e["colour_accuracy"]) / e["n"] for e in (oe, ne)))
        lines[-1] += (
            " In the GPU evaluations (same prompts and judge; each model at its own default) colour accuracy "
            f"on the held-out prompts is {_pct(ne['colour_accuracy_heldout_prompts'])} against "
            f"{_pct(oe['colour_accuracy_heldout_prompts'])} for the {label}, and on all prompts "
            f"{_pct_se(ne['colour_accuracy'], ne['n'])} against {_pct_se(oe['colour_accuracy'], oe['n'])} "
            f"(n = {ne['n']} each; the held-out prompts are a subset, so their error is larger): a "
            f"difference of {100 * diff:+.1f} points, "
            + ("within" if abs(diff) < 2 * se else "beyond")
            + f" two standard errors of the difference ({100 * se:.1f} points), from one seeded run each. "
            f"Per colour ({label} → these weights, n = {ne['n'] // len(COLOUR_NAMES)} each): "
            + ", ".join(
                f"{c} {_pct(oe['per_colour_accuracy'][c])} → {_pct(ne['per_colour_accuracy'][c])}"
                for c in changed
            )
            + "; the others unchanged."
        )
    words_no = [w for w, r in new["per_word"].items() if not r[has_key]]
    go, gn = old["groups"], new["groups"]
    missed = sorted(
        ((w, r) for w, r in old["per_word"].items() if r["correct"] < r["n"]), key=lambda x: x[1]["colour"]
    )
    missed_new = [(w, r) for w, r in new["per_word"].items() if r["correct"] < r["n"]]
    d_old, d_new = old["defaults"], new["defaults"]
    no_words = ", ".join(words_no) if len(words_no) <= 12 else f"{len(words_no)} names"
    if effect.get("added", "v1") == "v1":
        intro = (
            f"What a user gets from it: the {n_added} colour words added to training since v1, in "
            f'"{effect["prompt"]}" (`python -m training.diagnose_colours --compare-old`, CPU, {per_word} '
            "samples per word, garments cycling through the 10 classes, the same seeds for both models; v1 "
            f"at its defaults {d_old['sampler']} {d_old['num_inference_steps']} steps guidance "
            f"{d_old['guidance_scale']}, these weights at {d_new['sampler']} {d_new['num_inference_steps']} "
            f"steps guidance {d_new['guidance_scale']}). For v1 these words were unseen; here they are "
            "training words."
        )
    else:
        intro = (
            f"What a user gets from it: {added_desc} ({n_added}), in "
            f'"{effect["prompt"]}" (`python -m training.diagnose_colours --compare-old --added '
            f"{effect['added']}`, CPU, {per_word} sample{'s' if per_word != 1 else ''} per name, garments "
            f"cycling through the 10 classes, the same seeds for both models, each model at its own "
            f"defaults: the {label} {d_old['sampler']} {d_old['num_inference_steps']} steps guidance "
            f"{d_old['guidance_scale']}, these weights {d_new['sampler']} {d_new['num_inference_steps']} "
            f"steps guidance {d_new['guidance_scale']}). For the {label} these names were unseen; here they "
            "are training words, each tinted with the palette colour the colour judge calls its RGB "
            "(`captions.xkcd_colour_names`). Right means judged as that palette colour, so a pale name such "
            "as 'pale mauve' counts as white: some of the 10-word weights' misses are names drawn as the "
            "colour their words say rather than the one their RGB was assigned to."
        )
    lines += [
        "",
        intro,
        "",
        f"| added words | n | {label} | these weights |",
        "|---|---|---|---|",
        f"| all | {old['overall']['n']} | {_pct_se_inner(old['overall']['accuracy'], old['overall']['n'])} "
        f"| {_pct_se_inner(new['overall']['accuracy'], new['overall']['n'])} |",
        f"| containing {group_desc} ({n_added - len(words_no)} words) "
        f"| {go[has_key]['n']} | {_pct(go[has_key]['accuracy'])} "
        f"| {_pct(gn[has_key]['accuracy'])} |",
        f"| not containing one ({no_words}) | {go[no_key]['n']} "
        f"| {_pct(go[no_key]['accuracy'])} | {_pct(gn[no_key]['accuracy'])} |",
    ]
    for c in COLOUR_NAMES:
        o, n = old["per_colour"][c], new["per_colour"][c]
        lines.append(f"| {c} | {o['n']} | {_pct(o['accuracy'])} | {_pct(n['accuracy'])} |")
    fmt = lambda rows: "; ".join(  # noqa: E731
        f"'{w}' ({r['colour']}) {r['correct']}/{r['n']} as {_verdicts(r['judged_as'])}" for w, r in rows
    )
    many = len(missed) > 20  # the XKCD step: listed per word in its JSON file instead
    lines += [
        "",
        f"Words the {label} drew wrong at least once ({len(missed)} of {n_added}): "
        + (
            "per word in `training/colour_vocab_effect_xkcd.json`"
            if many
            else (fmt(missed) if missed else "none")
        )
        + f". Words these weights drew wrong ({len(missed_new)}): "
        + (fmt(missed_new) if missed_new else "none")
        + ".",
        "",
    ]
    if previous:
        lines += _previous_effect(previous)
    return lines


def card(
    name: str,
    tr: dict | None,
    ev: dict | None,
    meta: dict,
    notes: dict | None = None,
    diagnosis: dict | None = None,
) -> str:
    """The model card (README.md) of one shipped folder; `notes` / `diagnosis`: see NOTES / DIAGNOSIS."""
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
        caps = _captions(tr)
        lines += [
            "",
            f"Colourising: each garment is scaled so its brightest pixel is 1 and multiplied by one of "
            f"{len(COLOUR_NAMES)} colours ({', '.join(COLOUR_NAMES)}), drawn per sample per step. Captions: "
            + _caption_count(caps)
            + ' (e.g. "a crimson trainer", "a navy coloured jumper"); 10% replaced by the empty prompt. '
            f"Held out from training: the colour words {', '.join(HELDOUT_COLOUR_WORDS.values())}; their own "
            f"garment words; the templates {', '.join(repr(t) for t in HELDOUT_TEMPLATES)}.",
        ]
        if "colour_words" in caps:
            lines += [
                "",
                "Training colour words (canonical first): "
                + "; ".join(f"{c}: {', '.join(ws)}" for c, ws in caps["colour_words"].items())
                + ".",
            ]
        if caps.get("xkcd_colour_names"):
            lines += [
                "",
                f"Vocabulary: the {caps['colour_words_per_colour']} colour words per colour above plus "
                f"{caps['xkcd_colour_names']} colour names of the XKCD colour survey (CC0; "
                "`training/xkcd_colours.tsv`), each assigned to the palette colour the colour judge calls "
                "its RGB (`captions.xkcd_colour_names`; the garment is tinted with that palette colour, not "
                "the name's own RGB), per colour: "
                + ", ".join(f"{c} {n}" for c, n in caps["xkcd_names_per_colour"].items())
                + ". None of them contains a held-out colour word.",
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
            f"Evaluated on {ev.get('gpu') or ev['device']} in {_num(ev.get('eval_seconds'), '{:.0f}')} s "
            + ("(sweep, confirmation run, grid)." if ev.get("sweep") else "(one run at the defaults, grid).")
            + " ± is the binomial standard error sqrt(p(1-p)/n).",
            "",
            (
                f"Default chosen by the evaluation: **{d['sampler']}, {d['num_inference_steps']} steps, "
                f"guidance {d['guidance_scale']}**. Rule: {ev['selection_rule']}."
                if ev.get("sweep")
                else f"Defaults: **{d['sampler']}, {d['num_inference_steps']} steps, guidance "
                f"{d['guidance_scale']}**, the base model's (chosen by its evaluation; no sweep of its own), "
                "control scale 1.0."
            ),
            "",
            *_tradeoff(name, ev),
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
                val = (
                    _num(f[k], "{:.3f}")
                    if k.startswith("edge")
                    else (_pct_se(f[k], f["n"]) if "heldout" not in k else _pct(f[k]))
                )
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
    # shipped_run.json "_reproduce": the command line of the run that made the model (budgets included)
    command = (notes or {}).get("_reproduce", {}).get(name, "bash training/run_all.sh")
    lines += [
        "",
        "## Reproduce",
        "",
        f"`{command}` (see `training/README.md`); this model: "
        f"`python -m training.{SCRIPTS[name]}"
        f"{' --steps ' + str(tr['steps']) + ' --seconds 100000' if tr else ''}` (the step count of this run "
        "with the time budget out of the way; without `--seconds` the default budget may stop it earlier). "
        "Seeded; the data order and noise are fixed by the seed.",
        "",
    ]
    lines += _limitations(name, tr, ev, diagnosis)
    if notes and notes.get(name):
        lines += ["## Provenance (what happened during the run)", "", *notes[name], ""]
    return "\n".join(lines)


def package(run: Path, out: Path, models: tuple[str, ...] | list[str] = MODELS) -> None:
    """Shipped folders for `models` (default: all four) from the run; a model without train.json is
    skipped, and the judge (`fashion-classifier`) is packaged only when asked for (a text-only run evaluates
    with the shipped judge, which it did not train)."""
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(models) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; known: {MODELS}")
    evs = {}
    for name, kind in (("fashion-class", "class"), ("fashion-text", "text"), ("fashion-text-edges", "text")):
        if name not in models:
            continue
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
            "defaults": _defaults(name, ev, _read(run / "fashion-text" / "eval.json") if control else None),
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
    if "fashion-classifier" in models and (cdir / "model.safetensors").exists():
        dst = out / "fashion-classifier"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(cdir, dst)
        info = _read(cdir / "config.json") or {}
        ref = next((ev["reference"] for _, ev in evs.values() if ev), None)
        (dst / "README.md").write_text(classifier_card(info, ref))
    write_readme(out, evs)


def classifier_card(info: dict, ref: dict | None) -> str:
    return "\n".join(
        [
            "# fashion-classifier",
            "",
            "The independent judge of the evaluation (`training/classifier.py`): a 5-conv CNN trained on "
            "the real Fashion-MNIST training split only, on the colour-free view (max over channels, "
            "per-image max scaled). Its 128-d penultimate features are the space of the Fréchet distances. "
            "Not a served model.",
            "",
            f"- {info.get('num_params', 0):,} parameters, {info.get('steps')} steps of batch "
            f"{info.get('batch')}, {_num(info.get('seconds'), '{:.0f}')} s, seed {info.get('seed')}",
            f"- test accuracy: {_pct_se(info.get('test_accuracy_gray'), (ref or {}).get('test_images'))} "
            "(gray)"
            + (f", {_pct(ref['classifier_test_accuracy_tinted'])} (colourised test images)" if ref else ""),
            "",
        ]
    )


def write_cards(
    folder: Path,
    notes_path: Path | None = NOTES,
    diagnosis_path: Path | None = DIAGNOSIS,
    vocab_path: Path | None = VOCAB_EFFECT,
    vocab_xkcd_path: Path | None = VOCAB_EFFECT_XKCD,
) -> None:
    """Rewrite the cards and README.md of shipped folders from their train.json / eval.json (no run).

    The vocabulary comparison shown is the one whose new model is these weights (the XKCD step, else the
    3 -> 10-word step); the 3 -> 10-word step is also shown, as the step before, when its new model is the
    XKCD step's old one."""
    notes = load_notes(notes_path)
    diagnosis = diagnosis_for(folder, _read(diagnosis_path) if diagnosis_path else None)
    v1_step = _read(vocab_path) if vocab_path else None
    xkcd_step = _read(vocab_xkcd_path) if vocab_xkcd_path else None
    effect = vocab_effect_for(folder, xkcd_step) if xkcd_step else None
    previous = None
    if effect and v1_step:
        old_sha = effect["models"]["old"].get("train_json_sha256")
        if v1_step["models"]["new"].get("train_json_sha256") == old_sha:
            previous = v1_step
    elif v1_step:
        effect = vocab_effect_for(folder, v1_step)
    if diagnosis and effect:
        diagnosis = {**diagnosis, "vocab_effect": effect, "vocab_effect_previous": previous}
    evs = {}
    for name in SCRIPTS:
        tr, ev = _read(folder / name / "train.json"), _read(folder / name / "eval.json")
        evs[name] = (tr, ev)
        meta = _read(folder / name / "unet_server.json")
        if tr is not None and meta is not None:
            diag = diagnosis if name == "fashion-text" else None
            (folder / name / "README.md").write_text(card(name, tr, ev, meta, notes, diag))
    info = _read(folder / "fashion-classifier" / "config.json")
    if info is not None:
        ref = next((ev["reference"] for _, ev in evs.values() if ev), None)
        (folder / "fashion-classifier" / "README.md").write_text(classifier_card(info, ref))
    write_readme(folder, evs, notes, diagnosis)


def _sharing(evs: dict) -> str:
    """Whether the models' training processes shared the GPU (train.json "gpu_shared"; absent: shared)."""
    shared = [n for n, (tr, _) in evs.items() if tr and tr.get("gpu_shared", True)]
    alone = [n for n, (tr, _) in evs.items() if tr and not tr.get("gpu_shared", True)]
    if not alone:
        return "two processes shared the GPU."
    if not shared:
        return "one training process had the GPU to itself."
    return (
        f"{', '.join(shared)}: two processes shared the GPU; {', '.join(alone)}: one process had it to "
        "itself."
    )


def _readme_vocab_sentence(tr: dict | None, diagnosis: dict) -> str:
    """What the wider vocabulary did, for weights/README.md: held-out words missed, added words drawn."""
    caps = _captions(tr)
    effect = diagnosis["vocab_effect"]
    vocab = f"{caps['colour_words_per_colour']} colour words per colour" + (
        f" plus {caps['xkcd_colour_names']} XKCD colour names" if caps.get("xkcd_colour_names") else ""
    )
    rows = _heldout_rows(diagnosis)
    still = [
        f"'{HELDOUT_COLOUR_WORDS[c]}' {r['right']}/{r['n']}"
        for c, r in rows.items()
        if r["right"] < r["n"] / 2
    ]
    new = effect["models"]["new"]["overall"]
    label = _effect_labels(effect)[0]
    old = effect["models"]["old"]["overall"]
    return (
        f" Training with {vocab} did not fix that"
        + (f" (CPU diagnosis, judged right: {', '.join(still)})" if still else "")
        + f"; the added words themselves are drawn in their colour {_pct(new['accuracy'])} of the time "
        f"(n = {new['n']}; {_pct(old['accuracy'])} by the {label}, for which they were unseen)."
    )


def write_readme(out: Path, evs: dict, notes: dict | None = None, diagnosis: dict | None = None) -> None:
    lines = [
        "# Shipped weights",
        "",
        "Small models trained on Fashion-MNIST by `training/run_all.sh` on one GPU. Every number below is "
        "written by `training/package.py` from each folder's train.json / eval.json "
        "(`training/evaluate.py`); details, sweeps, grids and known limitations are in each folder's "
        "README.md. ± is the binomial "
        "standard error; n is the number of generated samples judged.",
        "",
        "| model | default sampler | steps | guidance | class acc | colour acc (all / held-out prompts) | "
        "edge F1 (vs no control) | FD (ref real) | n | goals met | training | GPU time (train + eval) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (tr, ev) in evs.items():
        if tr is None:
            lines.append(f"| {name} | not trained | | | | | | | | | | |")
            continue
        if not ev:
            lines.append(f"| {name} | not evaluated | | | | | | | | | {tr['steps']} steps | |")
            continue
        f = ev["final"]
        d = ev["default"]
        colour = (
            f"{_pct_se(f.get('colour_accuracy'), f['n'])} / {_pct(f.get('colour_accuracy_heldout_prompts'))}"
            if "colour_accuracy" in f
            else "—"
        )
        edge = (
            f"{_num(f.get('edge_f1'), '{:.3f}')} ({_num(f.get('edge_f1_without_control'), '{:.3f}')})"
            if ("edge_f1" in f)
            else "—"
        )
        met = ", ".join(f"{k} {'yes' if v else '**NO**'}" for k, v in ev["goals_met"].items())
        gpu = ev.get("gpu") or ev["device"]
        lines.append(
            f"| {name} | {d['sampler']} | {d['steps']} | {d['guidance']} "
            f"| {_pct_se(f.get('class_accuracy'), f['n'])} | {colour} | {edge} "
            f"| {_num(f.get('fd'))} ({_num(f.get('fd_reference_real_train_vs_test'))}) | {f['n']} | {met} "
            f"| {tr['steps']} steps of batch {tr['batch']}, {tr['device']} "
            f"| {tr['seconds_total']:.0f} s + {_num(ev.get('eval_seconds'), '{:.0f}')} s on {gpu} |"
        )
    if set(evs) != set(SCRIPTS):
        lines += [
            "",
            f"This folder holds only {', '.join(evs)} (a partial run, e.g. `run_all.sh --text-only`). Unpack "
            "them into `weights/` next to the other models and run `python -m training.package --cards "
            "weights` for the full table.",
        ]
    ref = next((ev["reference"] for _, ev in evs.values() if ev), None)
    if ref:
        lines += [
            "",
            "Judge (`fashion-classifier`): "
            f"{_pct_se(ref['classifier_test_accuracy_gray'], ref['test_images'])} test accuracy on "
            f"the {ref['test_images']:,} real test images, "
            f"{_pct(ref['classifier_test_accuracy_tinted'])} on colourised test images; colour judge "
            f"{_pct(ref['colour_judge_accuracy_real_tinted'])} on real colourised test images. FD is "
            "measured in the judge's 128-d feature space against the real test set; the reference in "
            "brackets is as many "
            "real training images against the same test set. Goals: "
            + "; ".join(f"{n}: " + ", ".join(f"{k} ≥ {v}" for k, v in g.items()) for n, g in GOALS.items())
            + ". Training time is the wall time of the training process (torch.compile included); "
            + _sharing(evs),
        ]
    missed = [
        f"{n} {k} {_pct(ev['final'][k])} (held-out prompts {_pct(ev['final'].get(k + '_heldout_prompts'))})"
        for n, (_, ev) in evs.items()
        if ev
        for k, ok in ev["goals_met"].items()
        if not ok
    ]
    lines += ["", "## Known limitations", ""]
    if missed:
        lines.append(
            "- **Goal not met**: "
            + "; ".join(missed)
            + (
                ". The misses are the model's, on held-out colour words that the frozen MiniLM encoder "
                "places "
                "near another colour or near none; seen colour words are drawn right."
                + (
                    _readme_vocab_sentence(evs["fashion-text"][0], diagnosis)
                    if diagnosis.get("vocab_effect") and "fashion-text" in evs
                    else ""
                )
                + " Evidence and what would fix it: `fashion-text/README.md`."
                if diagnosis
                else "."
            )
        )
    lines.append("- 32×32 only; Fashion-MNIST's 10 garment classes; the text models know 12 colours.")
    _, class_ev = evs.get("fashion-class", (None, None))
    if (
        class_ev
        and _tradeoff("fashion-class", class_ev)
        and "lower FD" in _tradeoff("fashion-class", class_ev)[0]
    ):
        lines.append(
            "- `fashion-class`'s default guidance was chosen for class accuracy; lower guidance also meets "
            "the goal, with a lower FD (the trade-off is in its README.md)."
        )
    lines += ["- One seeded, time-budgeted run per model; run-to-run variation is not measured.", ""]
    if notes and notes.get("weights"):
        lines += ["## Provenance (what happened during the run)", "", *notes["weights"], ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a training run folder (with --out)")
    ap.add_argument("--out", help="where the shipped folders go")
    ap.add_argument("--cards", help="rewrite the cards of these shipped folders (e.g. weights) in place")
    ap.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=MODELS,
        help="what to package from the run (default: all; a text-only run: fashion-text fashion-text-edges)",
    )
    args = ap.parse_args(argv)
    if args.cards:
        write_cards(Path(args.cards))
        log(f"cards rewritten in {args.cards}")
        return
    if not (args.run and args.out):
        ap.error("--run and --out, or --cards")
    package(Path(args.run), Path(args.out), args.models)
    log(f"packaged into {args.out}")


if __name__ == "__main__":
    main()
