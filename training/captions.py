"""Colours, garment names, caption templates and the caption table of the text models.

Every string the GPU run encodes comes from this module (`all_texts`): the pruned text-encoder copy that
travels to the GPU (`export_text_encoder.py`) keeps exactly the vocabulary these strings need.

Training captions, per (class, colour): the full product of the colour's 10 canonical training words × 3
garment words × 6 templates (180 captions), then `XKCD_PER_PAIR` = 28 captions with XKCD colour names
(208 per (class, colour); 10 classes × 12 colours × 208 = 24,960 captions).

Each colour has 10 canonical training words (issue 5: with 3 per colour the model learned 36 words by heart,
and drew a held-out word that all-MiniLM-L6-v2 puts near another colour's words in that colour): the
canonical name first, then common colour names of that class under the RGB palette below — modifiers that
keep the class ("bright", "deep", "light", "vivid"), object, food, gem and material names ("tomato red", "sky
blue", "ruby red", "chalk white"). Names that sit between two palette colours ("indigo", "magenta", "olive",
"tan", …) are left out.

10 words per colour did not move the held-out accuracy either, so the training vocabulary also takes a large
natural colour vocabulary: the names of the XKCD colour survey (`xkcd_colours.tsv`, CC0), each assigned to a
palette colour by the evaluation's own colour judge (`xkcd_class`: the judge's feature of a garment whose
brightest pixels have the name's RGB, nearest palette colour, kept only with a clear margin) — so the model
learns a general map from MiniLM's states to colour instead of 120 words. The image tint stays the palette
colour (`COLOURS`); only the caption words widen. `xkcd_colour_names` lists the kept names and why the
others were dropped.

The held-out words, garment words and templates below are the evaluation's test set: no training caption
contains them, and no training colour word (canonical or XKCD) contains the distinctive part of a held-out
colour word ("aqua", "amethyst", …) or shares a MiniLM word piece with it (`tests/training/test_captions.py`).
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from pathlib import Path

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# name -> RGB in [0, 1]. Distinct hues, plus value pairs (blue / dark blue, orange / brown, white / gray)
# that the
# colour judge separates by brightness; the garment's brightest pixel is exactly this colour.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (1.00, 0.90, 0.10),
    "green": (0.10, 0.75, 0.20),
    "teal": (0.00, 0.75, 0.75),
    "blue": (0.20, 0.45, 1.00),
    "dark blue": (0.05, 0.10, 0.50),
    "purple": (0.55, 0.15, 0.80),
    "pink": (1.00, 0.45, 0.75),
    "brown": (0.50, 0.28, 0.10),
    "white": (1.00, 1.00, 1.00),
    "gray": (0.50, 0.50, 0.50),
}
COLOUR_NAMES = list(COLOURS)

# Words used in training (first = canonical; the first three are those of the shipped v1 weights) and
# held-out words (evaluation only). Every colour has the same number of words (the caption table's layout).
# fmt: off
COLOUR_WORDS: dict[str, list[str]] = {
    "red": [
        "red", "crimson", "scarlet", "bright red", "deep red",
        "tomato red", "blood red", "fire engine red", "ruby red", "strawberry red",
    ],
    "orange": [
        "orange", "tangerine", "bright orange", "deep orange", "carrot orange",
        "mandarin orange", "citrus orange", "safety orange", "neon orange", "vivid orange",
    ],
    "yellow": [
        "yellow", "lemon yellow", "golden", "bright yellow", "lemon",
        "banana yellow", "sunflower yellow", "sunny yellow", "sunshine yellow", "vivid yellow",
    ],
    "green": [
        "green", "emerald", "grass green", "bright green", "leaf green",
        "lime green", "forest green", "apple green", "fern green", "mint green",
    ],
    "teal": [
        "teal", "turquoise", "cyan", "bright teal", "deep teal",
        "dark cyan", "bright cyan", "light turquoise", "blue-green", "vivid teal",
    ],
    "blue": [
        "blue", "azure", "cobalt blue", "bright blue", "sky blue",
        "light blue", "electric blue", "french blue", "vivid blue", "clear blue",
    ],
    "dark blue": [
        "dark blue", "navy", "navy blue", "dark navy", "deep navy",
        "ink blue", "oxford blue", "marine blue", "very dark blue", "deep dark blue",
    ],
    "purple": [
        "purple", "violet", "lilac", "bright purple", "deep purple",
        "grape", "lavender", "dark violet", "vivid purple", "iris purple",
    ],
    "pink": [
        "pink", "rose", "hot pink", "bright pink", "light pink",
        "baby pink", "blush pink", "soft pink", "powder pink", "neon pink",
    ],
    "brown": [
        "brown", "chocolate", "coffee brown", "dark brown", "chocolate brown",
        "cocoa brown", "cinnamon brown", "saddle brown", "leather brown", "earth brown",
    ],
    "white": [
        "white", "snow white", "ivory", "bright white", "pure white",
        "milk white", "chalk white", "paper white", "cloud white", "cotton white",
    ],
    "gray": [
        "gray", "grey", "silver", "mid gray", "medium grey",
        "ash gray", "dove grey", "smoke grey", "steel gray", "neutral gray",
    ],
}
# fmt: on
HELDOUT_COLOUR_WORDS: dict[str, str] = {
    "red": "cherry red",
    "orange": "pumpkin orange",
    "yellow": "canary yellow",
    "green": "kelly green",
    "teal": "aqua",
    "blue": "royal blue",
    "dark blue": "midnight blue",
    "purple": "amethyst",
    "pink": "bubblegum pink",
    "brown": "chestnut",
    "white": "pearl white",
    "gray": "slate grey",
}
GARMENT_WORDS: list[list[str]] = [
    ["t-shirt", "tee", "top"],
    ["pair of trousers", "pair of pants", "pair of jeans"],
    ["pullover", "sweater", "jumper"],
    ["dress", "frock", "gown"],
    ["coat", "jacket", "overcoat"],
    ["sandal", "flip-flop", "strappy sandal"],
    ["shirt", "button-up shirt", "blouse"],
    ["sneaker", "trainer", "running shoe"],
    ["bag", "handbag", "purse"],
    ["ankle boot", "boot", "short boot"],
]
HELDOUT_GARMENT_WORDS: list[str] = [
    "tee shirt",
    "pair of slacks",
    "knit sweater",
    "summer dress",
    "winter coat",
    "beach sandal",
    "collared shirt",
    "sports shoe",
    "tote bag",
    "chelsea boot",
]
TEMPLATES = [
    "a {c} {g}",
    "{c} {g}",
    "a photo of a {c} {g}",
    "a {g} in {c}",
    "a {c} coloured {g}",
    "an image of a {c} {g}",
]
HELDOUT_TEMPLATES = ["a picture showing a {c} {g}", "{g}, {c}"]


def caption(template: str, colour_word: str, garment_word: str) -> str:
    text = template.format(c=colour_word, g=garment_word)
    return re.sub(r"\ba ([aeiou])", r"an \1", text)  # "an orange bag", "an emerald dress"


# ---- XKCD colour names ---------------------------------------------------------------------------------

XKCD_TABLE = Path(__file__).with_name("xkcd_colours.tsv")
XKCD_MARGIN = 0.15  # judge-feature distance: second-nearest palette colour minus nearest
# a colour with fewer than 8 names at XKCD_MARGIN takes its best 8 with a margin ≥ 0.05
XKCD_MIN_NAMES, XKCD_LOW_MARGIN = 8, 0.05
XKCD_MIN_VALUE = 0.3  # darker names (near black) have no palette colour
XKCD_PER_PAIR = 28  # XKCD captions per (class, colour): 21,600 + 120 × 28 = 24,960 captions
XKCD_SEED = 5
# Name parts never used: the distinctive parts of the held-out colour words, "bubble" (a MiniLM word piece of
# "bubblegum": "bubble gum pink"), "kelley" (XKCD's spelling of the held-out "kelly green"), crude names.
XKCD_EXCLUDE = (
    "cherry", "pumpkin", "canary", "kelly", "aqua", "royal", "midnight", "amethyst", "bubblegum", "chestnut",
    "pearl", "slate", "bubble", "kelley",
    "shit", "piss", "poo", "puke", "vomit", "booger", "barf", "snot", "bile", "sick",
)  # fmt: skip
# A name whose last word is a basic colour term must be judged one of that term's palette colours ("pale grey"
# judged white, "dark hot pink" judged red, "camouflage green" judged brown are dropped).
_HEAD_CLASSES: dict[str, set[str]] = {
    "red": {"red"},
    "orange": {"orange"},
    "yellow": {"yellow"},
    "green": {"green", "teal"},
    "teal": {"teal"},
    "cyan": {"teal"},
    "turquoise": {"teal"},
    "blue": {"blue", "dark blue", "teal"},
    "navy": {"dark blue"},
    "purple": {"purple"},
    "purpl": {"purple"},
    "violet": {"purple"},
    "lilac": {"purple"},
    "lavender": {"purple"},
    "pink": {"pink"},
    "rose": {"pink"},
    "magenta": {"pink", "purple"},
    "brown": {"brown"},
    "white": {"white"},
    "grey": {"gray"},
    "gray": {"gray"},
}


def judge_feature(rgb: tuple[float, float, float]) -> tuple[float, ...]:
    """`evaluate.colour_features` of a garment whose brightest pixels are `rgb`: (rgb / max, max)."""
    value = max(max(rgb), 1e-3)
    return (*(c / value for c in rgb), value)


def xkcd_class(rgb: tuple[float, float, float]) -> tuple[str, float]:
    """The palette colour the colour judge calls `rgb` (nearest palette feature; the judge's centroids are the
    features of garments tinted with `COLOURS`) and the margin to the second-nearest."""
    f = judge_feature(rgb)
    d = sorted(
        (sum((a - b) ** 2 for a, b in zip(f, judge_feature(c), strict=True)) ** 0.5, n)
        for n, c in COLOURS.items()
    )
    return d[0][1], d[1][0] - d[0][0]


def _head_ok(name: str, colour: str) -> bool:
    last = name.split()[-1]
    # "greyish", "purpley", "pinky"
    head = last if last in _HEAD_CLASSES else re.sub(r"(ish|ey|y)$", "", last)
    return head not in _HEAD_CLASSES or colour in _HEAD_CLASSES[head]


@functools.cache
def xkcd_colour_names() -> dict[str, list[str]]:
    """Palette colour -> the XKCD names assigned to it, in table order.

    Kept: lower-case ASCII letters, spaces and hyphens, ≤ 3 words; value ≥ `XKCD_MIN_VALUE`; no
    `XKCD_EXCLUDE` part; the last word agrees (`_HEAD_CLASSES`); not a canonical word, and no word that
    only another colour's canonical words use ("mint" judged white: "mint green"; "rose red": "rose"); judge
    margin ≥ `XKCD_MARGIN` — or, for a colour the judge's palette makes narrow (orange: between red, yellow
    and brown), its `XKCD_MIN_NAMES` largest margins ≥ `XKCD_LOW_MARGIN`.
    """
    canonical = {w for words in COLOUR_WORDS.values() for w in words}
    # a word in one colour's canonical words only ("mint" of "mint green", "rose", "pink") marks that colour
    owner: dict[str, set[str]] = {}
    for colour, words in COLOUR_WORDS.items():
        for part in {p for w in words for p in w.split()}:
            owner.setdefault(part, set()).add(colour)
    found: dict[str, list[tuple[float, int, str]]] = {n: [] for n in COLOUR_NAMES}
    lines = [line for line in XKCD_TABLE.read_text().splitlines() if not line.startswith("#")]
    assert lines[0] == "name\thex", lines[0]
    for i, line in enumerate(lines[1:]):
        name, hx = line.split("\t")
        rgb = tuple(int(hx[i : i + 2], 16) / 255 for i in (1, 3, 5))
        colour, margin = xkcd_class(rgb)
        if (
            re.fullmatch(r"[a-z][a-z -]*[a-z]", name)
            and len(name.split()) <= 3
            and max(rgb) >= XKCD_MIN_VALUE
            and margin >= XKCD_LOW_MARGIN
            and not any(x in name for x in XKCD_EXCLUDE)
            and _head_ok(name, colour)
            and name not in canonical
            and all(owner.get(p, {colour}) == {colour} or len(owner[p]) > 1 for p in name.split())
        ):
            found[colour].append((margin, i, name))
    out = {}
    for colour, cands in found.items():
        best = sorted(cands, key=lambda c: (-c[0], c[1]))
        keep = [c for c in best if c[0] >= XKCD_MARGIN] or []
        if len(keep) < XKCD_MIN_NAMES:
            keep = best[:XKCD_MIN_NAMES]
        out[colour] = [name for _, _, name in sorted(keep, key=lambda c: c[1])]
    return out


def _xkcd_captions(class_id: int, colour: str) -> list[str]:
    """`XKCD_PER_PAIR` captions of (class, colour) with XKCD names: the colour's names in a seeded order,
    class k takes the next `XKCD_PER_PAIR` of them (cyclically, so a colour with ≤ 28 names has every name
    in every class), each with a seeded (garment word, template) combination, distinct within the class."""
    names = list(xkcd_colour_names()[colour])
    random.Random(XKCD_SEED * 1000 + COLOUR_NAMES.index(colour)).shuffle(names)
    assert len(names) * len(GARMENT_WORDS[0]) * len(TEMPLATES) >= XKCD_PER_PAIR, colour
    combos = list(itertools.product(GARMENT_WORDS[class_id], TEMPLATES))
    seen: dict[str, int] = {}
    texts = []
    for e in range(XKCD_PER_PAIR):
        name = names[(class_id * XKCD_PER_PAIR + e) % len(names)]
        r = seen[name] = seen.get(name, -1) + 1
        order = combos[:]
        random.Random(f"{XKCD_SEED}/{class_id}/{name}").shuffle(order)
        gw, tp = order[r]
        texts.append(caption(tp, name, gw))
    return texts


def training_captions(small: bool = False) -> tuple[list[str], list[tuple[int, int]]]:
    """All training captions and their (class, colour) labels, in a fixed order.

    Order: class-major, then colour; within (class, colour) the canonical product (colour word, garment word,
    template), then the `XKCD_PER_PAIR` XKCD captions. `small` keeps the first word and template only, no
    XKCD names (the smoke run: 120 captions instead of 24,960).
    """
    templates = TEMPLATES[:1] if small else TEMPLATES
    texts, labels = [], []
    for k, garments in enumerate(GARMENT_WORDS):
        for j, name in enumerate(COLOUR_NAMES):
            words = COLOUR_WORDS[name][:1] if small else COLOUR_WORDS[name]
            gwords = garments[:1] if small else garments
            pair = [caption(tp, cw, gw) for cw, gw, tp in itertools.product(words, gwords, templates)]
            if not small:
                pair += _xkcd_captions(k, name)
            texts += pair
            labels += [(k, j)] * len(pair)
    return texts, labels


def caption_summary(small: bool = False) -> dict:
    """What `training_captions(small)` is made of, for train.json and the model cards."""
    texts, _ = training_captions(small=small)
    pick = (lambda xs: xs[:1]) if small else (lambda xs: xs)
    xkcd = {} if small else xkcd_colour_names()
    return {
        "num_captions": len(texts),
        "templates": len(pick(TEMPLATES)),
        "colour_words_per_colour": len(pick(COLOUR_WORDS[COLOUR_NAMES[0]])),
        "garment_words_per_class": len(pick(GARMENT_WORDS[0])),
        "colour_words": {name: pick(words) for name, words in COLOUR_WORDS.items()},
        # XKCD colour survey names (CC0), XKCD_PER_PAIR captions per (class, colour) on top of the product
        "xkcd_colour_names": sum(map(len, xkcd.values())),
        "xkcd_captions_per_pair": 0 if small else XKCD_PER_PAIR,
        "xkcd_names_per_colour": {name: len(v) for name, v in xkcd.items()},
        "xkcd_source": "XKCD colour survey (CC0), npm xkcd-colors 1.0.2: training/xkcd_colours.tsv",
    }


def eval_prompt(class_id: int, colour_id: int, variant: int) -> str:
    """Evaluation prompt `variant`: even = canonical training words, odd = held-out words and templates."""
    name = COLOUR_NAMES[colour_id]
    if variant % 2 == 0:
        return caption(TEMPLATES[0], COLOUR_WORDS[name][0], GARMENT_WORDS[class_id][0])
    tp = HELDOUT_TEMPLATES[(variant // 2) % len(HELDOUT_TEMPLATES)]
    return caption(tp, HELDOUT_COLOUR_WORDS[name], HELDOUT_GARMENT_WORDS[class_id])


def all_texts() -> list[str]:
    """Every string the training and evaluation ever encode (incl. "" for the unconditional context)."""
    texts, _ = training_captions()
    evals = [eval_prompt(k, j, v) for k in range(10) for j in range(len(COLOUR_NAMES)) for v in range(4)]
    return [""] + texts + evals
