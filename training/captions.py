"""Colours, garment names, caption templates and the caption table of the text models.

Every string the GPU run encodes comes from this module (`all_texts`): the pruned text-encoder copy that
travels to the GPU (`export_text_encoder.py`) keeps exactly the vocabulary these strings need.

Training captions are the full product (class, colour, colour word, garment word, template): 10 classes ×
12 colours × 10 colour words × 3 garment words × 6 templates = 21,600 captions, 180 per (class, colour).
Each colour has 10 training words (issue 5: with 3 per colour the model learned 36 words by heart, and drew
a held-out word that all-MiniLM-L6-v2 puts near another colour's words in that colour): the canonical name
first, then common colour names of that class under the RGB palette below — modifiers that keep the class
("bright", "deep", "light", "vivid"), object, food, gem and material names ("tomato red", "sky blue", "ruby
red", "chalk white"). Names that sit between two palette colours ("indigo", "magenta", "olive", "tan", …) are
left out.

The held-out words, garment words and templates below are the evaluation's test set: no training caption
contains them, and no training colour word contains the distinctive part of a held-out colour word ("aqua",
"amethyst", …) or shares a MiniLM word piece with it (`tests/training/test_captions.py`).
"""

from __future__ import annotations

import itertools
import re

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


def training_captions(small: bool = False) -> tuple[list[str], list[tuple[int, int]]]:
    """All training captions and their (class, colour) labels, in a fixed order.

    Order: class-major, then colour, then colour word, garment word, template. `small` keeps the first word
    and template only (the smoke run: 120 captions instead of 21,600).
    """
    templates = TEMPLATES[:1] if small else TEMPLATES
    texts, labels = [], []
    for k, garments in enumerate(GARMENT_WORDS):
        for j, name in enumerate(COLOUR_NAMES):
            words = COLOUR_WORDS[name][:1] if small else COLOUR_WORDS[name]
            gwords = garments[:1] if small else garments
            for cw, gw, tp in itertools.product(words, gwords, templates):
                texts.append(caption(tp, cw, gw))
                labels.append((k, j))
    return texts, labels


def caption_summary(small: bool = False) -> dict:
    """What `training_captions(small)` is made of, for train.json and the model cards."""
    texts, _ = training_captions(small=small)
    pick = (lambda xs: xs[:1]) if small else (lambda xs: xs)
    return {
        "num_captions": len(texts),
        "templates": len(pick(TEMPLATES)),
        "colour_words_per_colour": len(pick(COLOUR_WORDS[COLOUR_NAMES[0]])),
        "garment_words_per_class": len(pick(GARMENT_WORDS[0])),
        "colour_words": {name: pick(words) for name, words in COLOUR_WORDS.items()},
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
