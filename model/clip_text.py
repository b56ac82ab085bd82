"""CLIP text encoder of a Stable Diffusion pipeline folder: prompts -> (B, 77, D) cross-attention context.

transformers' `CLIPTextModel` and `CLIPTokenizer`, read from the folder's text_encoder/ and tokenizer/
(local files only, safetensors only: pickle weights are refused before transformers sees the folder). The
encoding is exactly diffusers' `StableDiffusionPipeline.encode_prompt`:

* ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True): BOS, up to 75 tokens, EOS,
  padding (EOS for SD 1.x's tokenizer, "!" for SD 2.x's);
* states = last_hidden_state (after the final LayerNorm); with `clip_skip=k` (k >= 1) the output of the
  k-th layer from the end, hidden_states[-(k + 1)], passed through the final LayerNorm (diffusers'
  convention; k = 1 is A1111's "clip skip 2").

Prompts longer than 77 tokens (BOS and EOS included) are truncated, as diffusers does; `encode_with_info`
says which were.

`SDXLTextEncoder` is SDXL's pair (`StableDiffusionXLPipeline.encode_prompt`): text_encoder (CLIPTextModel)
and text_encoder_2 (CLIPTextModelWithProjection), each with its own tokenizer; the context is the
penultimate hidden states of both (no final LayerNorm) concatenated along the feature dim, (B, 77, D1 + D2),
and `pooled` is the second encoder's projected pooled output, (B, projection_dim). With `clip_skip=k` both
take hidden_states[-(k + 2)] (diffusers applies clip_skip to the prompt only and always uses [-2] for the
negative prompt; here one prompt is encoded one way whichever row it conditions).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


@dataclass(frozen=True)
class TextEncoding:
    """Result of `CLIPTextEncoder.encode_with_info`."""

    states: torch.Tensor  # (B, max_length, hidden_size) in the encoder's dtype, on its device
    truncated: list[bool]  # per prompt: it had more than max_length tokens (BOS/EOS included) and was cut
    num_tokens: list[int]  # per prompt: its token count before truncation (BOS/EOS included)
    pooled: torch.Tensor | None = None  # (B, projection_dim): SDXL's pooled text embeds (None for SD)


class CLIPTextEncoder:
    """Tokenizer + CLIPTextModel: `encode(prompts) -> (B, 77, D)`; the unconditional context: encode([""])."""

    def __init__(self, tokenizer: Any, model: Any, clip_skip: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.clip_skip = clip_skip  # default for encode() when the call gives none
        self.max_length = int(tokenizer.model_max_length)
        if self.max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"tokenizer model_max_length {self.max_length} exceeds the text encoder's "
                f"max_position_embeddings {model.config.max_position_embeddings}"
            )
        self.hidden_size = int(model.config.hidden_size)
        self.num_layers = int(model.config.num_hidden_layers)

    @classmethod
    def load(
        cls,
        text_encoder_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        clip_skip: int | None = None,
        model_class: str = "CLIPTextModel",
    ) -> CLIPTextEncoder:
        """Load from a pipeline's text_encoder/ and tokenizer/ folders (offline, eval mode, no grad).

        dtype default fp32. variant: weights variant to prefer ("fp16"; as `model.loading.find_weights`).
        model_class: "CLIPTextModel" or "CLIPTextModelWithProjection" (SDXL's text_encoder_2).
        Raises `model.loading.WeightsError` for a pickle-only or empty text_encoder/ folder.
        """
        import transformers
        from transformers import CLIPTokenizer

        from model.loading import find_weights

        if model_class not in TEXT_ENCODER_CLASSES:
            raise ValueError(f"unsupported text encoder class {model_class!r}; one of {TEXT_ENCODER_CLASSES}")
        enc_dir, tok_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        _, found = find_weights(enc_dir, "model", variant)  # refuses .bin-only folders, never unpickles
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        model: Any = getattr(transformers, model_class).from_pretrained(
            str(enc_dir),
            local_files_only=True,
            use_safetensors=True,
            variant=found,
            dtype=dtype or torch.float32,
        )
        model = model.to(device or "cpu").eval().requires_grad_(False)
        return cls(tokenizer, model, clip_skip)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(input_ids, attention_mask), each (B, max_length) long on CPU, and the token count per prompt
        before truncation (BOS/EOS included)."""
        prompts = list(prompts)
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        # verbose=False: the full lengths are only counted, never fed to the model
        full = self.tokenizer(prompts, truncation=False, verbose=False).input_ids
        return tokens.input_ids, tokens.attention_mask, [len(x) for x in full]

    @torch.no_grad()
    def encode_with_info(self, prompts: list[str], clip_skip: int | None = None) -> TextEncoding:
        """States (B, max_length, hidden_size) and per-prompt truncation; clip_skip: see the module doc."""
        skip = self.clip_skip if clip_skip is None else clip_skip
        if skip is not None and not 0 <= skip < self.num_layers:
            raise ValueError(f"clip_skip must be in [0, {self.num_layers - 1}], got {skip}")
        ids, attention_mask, counts = self.tokenize(prompts)
        ids = ids.to(self.device)
        mask = None
        if getattr(self.model.config, "use_attention_mask", False):  # diffusers passes one only then
            mask = attention_mask.to(self.device)
        if not skip:
            states = self.model(ids, attention_mask=mask).last_hidden_state  # (B, L, D), after final LN
        else:
            out = self.model(ids, attention_mask=mask, output_hidden_states=True)
            # transformers < 5 nests the layers in .text_model; 5.x has them on the model itself
            final_norm = getattr(self.model, "text_model", self.model).final_layer_norm
            states = final_norm(out.hidden_states[-(skip + 1)])  # (B, L, D)
        truncated = [n > self.max_length for n in counts]
        if any(truncated):
            log.debug("%d of %d prompts truncated to %d tokens", sum(truncated), len(counts), self.max_length)
        return TextEncoding(states=states, truncated=truncated, num_tokens=counts)

    def encode(self, prompts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """Context (B, max_length, hidden_size) in the encoder's dtype, on its device."""
        return self.encode_with_info(prompts, clip_skip).states


class SDXLTextEncoder:
    """SDXL's two CLIP encoders: `encode(prompts) -> (B, 77, D1 + D2)`; `encode_with_info(...).pooled` is
    (B, projection_dim). The unconditional rows: encode([""]), or zeros (see `model.sdxl`)."""

    def __init__(self, first: CLIPTextEncoder, second: CLIPTextEncoder, clip_skip: int | None = None) -> None:
        if first.max_length != second.max_length:
            raise ValueError(
                f"tokenizer and tokenizer_2 disagree on model_max_length ({first.max_length} vs "
                f"{second.max_length})"
            )
        if not hasattr(second.model, "text_projection"):
            raise ValueError("text_encoder_2 must be a CLIPTextModelWithProjection (SDXL's pooled embeds)")
        self.first, self.second = first, second
        self.clip_skip = clip_skip
        self.max_length = first.max_length
        self.hidden_size = first.hidden_size + second.hidden_size  # the U-Net's cross_attention_dim
        self.pooled_size = int(second.model.config.projection_dim)  # text_embeds width
        self.num_layers = min(first.num_layers, second.num_layers)

    @classmethod
    def load(
        cls,
        text_encoder_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        text_encoder_2_dir: str | os.PathLike,
        tokenizer_2_dir: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        variants: tuple[str | None, str | None] = (None, None),
        clip_skip: int | None = None,
    ) -> SDXLTextEncoder:
        """Both encoders from an SDXL folder's text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/."""
        first = CLIPTextEncoder.load(text_encoder_dir, tokenizer_dir, device, dtype, variants[0])
        second = CLIPTextEncoder.load(
            text_encoder_2_dir, tokenizer_2_dir, device, dtype, variants[1],
            model_class="CLIPTextModelWithProjection",
        )  # fmt: skip
        return cls(first, second, clip_skip)

    @property
    def device(self) -> torch.device:
        return self.first.device

    @property
    def dtype(self) -> torch.dtype:
        return self.second.dtype

    @torch.no_grad()
    def encode_with_info(self, prompts: list[str], clip_skip: int | None = None) -> TextEncoding:
        """States (B, max_length, D1 + D2), pooled (B, projection_dim), per-prompt truncation (either
        tokenizer cut the prompt)."""
        skip = self.clip_skip if clip_skip is None else clip_skip
        if skip is not None and not 0 <= skip < self.num_layers - 1:
            raise ValueError(f"clip_skip must be in [0, {self.num_layers - 2}], got {skip}")
        layer = -((skip or 0) + 2)  # SDXL always starts from the penultimate layer
        states, truncated, counts, pooled = [], [False] * len(prompts), [0] * len(prompts), None
        for enc in (self.first, self.second):
            ids, _, n = enc.tokenize(prompts)
            # SDXL's encode_prompt passes no attention mask (padding is masked by CLIP's causal mask only)
            out = enc.model(ids.to(enc.device), output_hidden_states=True)
            states.append(out.hidden_states[layer].to(self.dtype))  # (B, L, D_i), no final LayerNorm
            truncated = [a or k > enc.max_length for a, k in zip(truncated, n, strict=True)]
            counts = [max(a, k) for a, k in zip(counts, n, strict=True)]
            pooled = getattr(out, "text_embeds", None)  # the second (projection) model's is kept
        assert pooled is not None  # __init__ checked text_encoder_2 has a projection
        if any(truncated):
            log.debug("%d of %d prompts truncated to %d tokens", sum(truncated), len(counts), self.max_length)
        return TextEncoding(
            states=torch.cat(states, dim=-1), truncated=truncated, num_tokens=counts, pooled=pooled
        )  # states (B, L, D1 + D2)

    def encode(self, prompts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """Context (B, max_length, D1 + D2) in text_encoder_2's dtype, on its device."""
        return self.encode_with_info(prompts, clip_skip).states
