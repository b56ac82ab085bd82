"""CPU probe: does a wider training colour vocabulary make MiniLM's token states of held-out colour words
readable as the right colour? A proxy for issue 5, without training a diffusion model.

Two feature kinds, both from all-MiniLM-L6-v2's last-layer token states of a caption, unit-norm: "colour
word" (the mean over the colour word's own word pieces) and "sentence" (the attention-mask-weighted mean over
the whole caption — sentence-transformers' pooling, the embedding this model was trained for). Training side:
every training colour word in the training captions of one garment class (all templates × garment words;
`--classes` widens it). Held-out side: the 12 held-out colour words, (a) in the seen template "a {word}
t-shirt" and (b) in the evaluation's held-out prompts (`eval_prompt` odd variants: held-out templates and
garment words, all 10 classes). Three readers per feature kind, each fitted on the training side only:
nearest training word (cosine to the mean feature of its captions), nearest colour centroid (cosine), and a
linear softmax probe (L2-regularised, full-batch L-BFGS). Run for the v1 vocabulary (the first 3 words per
colour) and the current one (`COLOUR_WORDS`); the held-out words never choose the vocabulary — this only
reports.

Ceiling estimate, per vocabulary and feature kind: the evaluation's colour accuracy if its canonical prompts
(1/3) were all right and its held-out prompts (2/3) as right as the best reader here, (1 + 2·acc) / 3 — what a
model reading the frozen encoder's states as well as that reader could reach, not a measured model.

    .venv/bin/python -m training.probe_colour_words [--classes 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from training.captions import (
    COLOUR_NAMES,
    COLOUR_WORDS,
    GARMENT_WORDS,
    HELDOUT_COLOUR_WORDS,
    TEMPLATES,
    caption,
    eval_prompt,
)

FEATURE_KINDS = ("colour word", "sentence")


def features(encoder, items: list[tuple[str, str]], batch: int = 256) -> dict[str, torch.Tensor]:
    """Per feature kind, (N, 384) unit-norm features of (prompt, word) items: the mean token state of `word`'s
    pieces in `prompt` ("colour word"), and the attention-mask-weighted mean over `prompt` ("sentence")."""
    tok = encoder.tokenizer
    word, sentence = [], []
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        prompts = [p for p, _ in chunk]
        states = encoder.encode(prompts).float()  # (B, L, 384)
        mask = encoder.tokenize(prompts)["attention_mask"].unsqueeze(-1).float()  # (B, L, 1)
        sentence.append(F.normalize((states * mask).sum(1) / mask.sum(1), dim=1))
        for b, (prompt, w) in enumerate(chunk):
            pieces, wp = tok.tokenize(prompt), tok.tokenize(w)
            start = next(j for j in range(len(pieces)) if pieces[j : j + len(wp)] == wp) + 1  # +1: [CLS]
            word.append(F.normalize(states[b, start : start + len(wp)].mean(0), dim=0))
    return {"colour word": torch.stack(word), "sentence": torch.cat(sentence)}


def linear_probe(x: torch.Tensor, y: torch.Tensor, k: int, l2: float = 1e-3) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], k)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


SEEN_SET = "seen template 'a {word} t-shirt'"
EVAL_SET = "held-out eval prompts (odd variants, 10 classes)"


def probe(encoder, words: dict[str, list[str]], classes: int) -> dict:
    train_items, train_y, train_word = [], [], []
    for j, name in enumerate(COLOUR_NAMES):
        for w in words[name]:
            for c in range(classes):
                for g in GARMENT_WORDS[c]:
                    for tp in TEMPLATES:
                        train_items.append((caption(tp, w, g), w))
                        train_y.append(j)
                        train_word.append(w)
    ft = features(encoder, train_items)
    yt = torch.tensor(train_y)
    vocab = [w for name in COLOUR_NAMES for w in words[name]]
    word_y = torch.tensor([COLOUR_NAMES.index(n) for n in COLOUR_NAMES for _ in words[n]])
    idx = torch.tensor([vocab.index(w) for w in train_word])

    sets = {
        SEEN_SET: [
            (caption(TEMPLATES[0], HELDOUT_COLOUR_WORDS[n], "t-shirt"), HELDOUT_COLOUR_WORDS[n], j)
            for j, n in enumerate(COLOUR_NAMES)
        ],
        EVAL_SET: [
            (eval_prompt(c, j, v), HELDOUT_COLOUR_WORDS[n], j)
            for c in range(10)
            for j, n in enumerate(COLOUR_NAMES)
            for v in (1, 3)
        ],
    }
    held = {
        name: (features(encoder, [(p, w) for p, w, _ in items]), torch.tensor([j for _, _, j in items]))
        for name, items in sets.items()
    }
    result = {"training_words": len(vocab), "training_items": len(train_items), "features": {}}
    for kind in FEATURE_KINDS:
        sets_k = {name: (fh[kind], yh) for name, (fh, yh) in held.items()}
        result["features"][kind] = read(ft[kind], yt, idx, word_y, sets_k)
    return result


def read(xt, yt, idx, word_y, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Fit the three readers on training features `xt` (labels `yt`, training word index `idx`), score them on
    each held-out set, and estimate the issue's colour-accuracy ceiling from the best one on EVAL_SET."""
    k = len(COLOUR_NAMES)
    word_means = F.normalize(torch.zeros(len(word_y), xt.shape[1]).index_add_(0, idx, xt), dim=1)
    centroids = F.normalize(torch.stack([xt[yt == j].mean(0) for j in range(k)]), dim=1)
    lin = linear_probe(xt, yt, k)
    out = {"sets": {}}
    for set_name, (xh, yh) in sets.items():
        with torch.no_grad():
            preds = {
                "nearest word": word_y[(xh @ word_means.T).argmax(1)],
                "nearest centroid": (xh @ centroids.T).argmax(1),
                "linear probe": lin(xh).argmax(1),
            }
        row = {}
        for reader, p in preds.items():
            per_word = {}
            for j, n in enumerate(COLOUR_NAMES):
                m = yh == j
                drawn = torch.bincount(p[m], minlength=k)
                per_word[HELDOUT_COLOUR_WORDS[n]] = {
                    "majority": COLOUR_NAMES[int(drawn.argmax())],
                    "accuracy": (p[m] == j).float().mean().item(),
                }
            row[reader] = {"accuracy": (p == yh).float().mean().item(), "read_as": per_word}
        out["sets"][set_name] = row
    best = max(out["sets"][EVAL_SET].items(), key=lambda kv: kv[1]["accuracy"])
    out["ceiling_estimate"] = {
        "what": "estimate, not a measurement: the issue's overall colour accuracy if canonical prompts "
        "(1/3) were all right and held-out prompts (2/3) as right as the best reader of the frozen encoder's "
        "states",
        "reader": best[0],
        "heldout_eval_accuracy": best[1]["accuracy"],
        "overall_colour_accuracy": (1 + 2 * best[1]["accuracy"]) / 3,
    }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=1, help="garment classes whose captions feed the readers")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    from model.text_encoder import TextEncoder

    encoder = TextEncoder.load()
    vocabularies = {
        "v1 (3 words per colour)": {n: w[:3] for n, w in COLOUR_WORDS.items()},
        f"current ({len(COLOUR_WORDS['red'])} words per colour)": COLOUR_WORDS,
    }
    results = {name: probe(encoder, words, args.classes) for name, words in vocabularies.items()}
    for vname, r in results.items():
        print(f"== {vname}: {r['training_words']} words, {r['training_items']} training captions")
        for kind, fr in r["features"].items():
            print(f"  [{kind} features]")
            for set_name, row in fr["sets"].items():
                print(f"    {set_name}")
                for reader, v in row.items():
                    wrong = {w: c["majority"] for w, c in v["read_as"].items()}
                    wrong = {w: c for w, c in wrong.items() if c != _colour_of(w)}
                    print(f"      {reader:16s} {100 * v['accuracy']:5.1f}%   wrong (majority): {wrong}")
            ce = fr["ceiling_estimate"]
            acc, ceiling = 100 * ce["heldout_eval_accuracy"], 100 * ce["overall_colour_accuracy"]
            print(
                f"    ceiling estimate (1 + 2·{acc:.1f}% [{ce['reader']}]) / 3 = {ceiling:.1f}% overall "
                "colour accuracy (if a model read the frozen encoder's states as well as that reader)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _colour_of(heldout_word: str) -> str:
    return next(n for n, w in HELDOUT_COLOUR_WORDS.items() if w == heldout_word)


if __name__ == "__main__":
    main()
