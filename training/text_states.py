"""The caption table: MiniLM token states of every training caption, computed once on the training device."""

from __future__ import annotations

import torch

from model.text_encoder import TextEncoder
from training.captions import COLOUR_NAMES, training_captions
from training.loop import log

_ENCODERS: dict[tuple, TextEncoder] = {}


def load_encoder(device: torch.device, dtype: torch.dtype) -> TextEncoder:
    """The text encoder (`UNET_SERVER_TEXT_ENCODER_DIR` or the package), loaded once per process."""
    from model.text_encoder import default_model_dir

    key = (str(device), dtype, default_model_dir())
    if key not in _ENCODERS:
        _ENCODERS[key] = TextEncoder.load(device=device, dtype=dtype)
    return _ENCODERS[key]


class CaptionTable:
    """states (N, 24, 384) for the captions of `training_captions`, `uncond` (1, 24, 384) = encode([""]).

    Captions are ordered (class, colour, variant), so the caption of a sample is
    `(class * K + colour) * per_pair + variant` with K colours and `per_pair` variants.
    """

    def __init__(self, device: torch.device, small: bool = False, dtype: torch.dtype | None = None) -> None:
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        texts, labels = training_captions(small=small)
        self.texts = texts
        self.per_pair = len(texts) // (10 * len(COLOUR_NAMES))
        enc_dtype = torch.float16 if device.type == "cuda" else torch.float32
        encoder = load_encoder(device, enc_dtype)
        unk = encoder.tokenizer.unk_token_id
        ids = encoder.tokenize(texts)["input_ids"]
        if unk is not None and (ids == unk).any():
            raise ValueError("a caption has word pieces the text encoder does not know (pruned vocabulary?)")
        chunks = [encoder.encode(texts[i : i + 1024]).to(dtype) for i in range(0, len(texts), 1024)]
        self.states = torch.cat(chunks)  # (N, 24, 384)
        self.uncond = encoder.encode([""]).to(dtype)  # (1, 24, 384)
        self.encoder = encoder
        log(
            f"caption table: {len(texts)} captions, {self.per_pair} per (class, colour), "
            f"{tuple(self.states.shape)}"
        )

    def ids(self, classes: torch.Tensor, colours: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
        return (classes * len(COLOUR_NAMES) + colours) * self.per_pair + variant

    def context(self, caption_ids: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """(B, 24, 384): the caption's states, or the unconditional states where `drop` (B,) is True."""
        return torch.where(drop[:, None, None], self.uncond, self.states[caption_ids])
