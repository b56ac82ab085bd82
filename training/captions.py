"""Colours, garment names, caption templates and the caption table of the text models.

Every string the GPU run encodes comes from this module (`all_texts`): the pruned text-encoder copy that
travels to
the GPU (`export_text_encoder.py`) keeps exactly the vocabulary these strings need.

Training captions combine (class, colour, colour word, garment word, template); the held-out words and
templates
below never appear in training and are used only by the evaluation.
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

# Words used in training (first = canonical) and held-out words (evaluation only).
COLOUR_WORDS: dict[str, list[str]] = {
    "red": ["red", "crimson", "scarlet"],
    "orange": ["orange", "tangerine", "bright orange"],
    "yellow": ["yellow", "lemon yellow", "golden"],
    "green": ["green", "emerald", "grass green"],
    "teal": ["teal", "turquoise", "cyan"],
    "blue": ["blue", "azure", "cobalt blue"],
    "dark blue": ["dark blue", "navy", "navy blue"],
    "purple": ["purple", "violet", "lilac"],
    "pink": ["pink", "rose", "hot pink"],
    "brown": ["brown", "chocolate", "coffee brown"],
    "white": ["white", "snow white", "ivory"],
    "gray": ["gray", "grey", "silver"],
}
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
    and
    template only (the smoke run: 120 captions instead of 6,480).
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
