"""Random LoRA adapter files for tests, written in the formats users have (diffusers/PEFT and kohya).

Layers are picked from a model's own layer specs (``model.lora.layer_specs``), so the same helper writes
adapters for the tiny SD pipelines of tests/model/sd_helpers.py and for the shipped models.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.lora import METADATA_KEY, LayerSpec

# U-Net layers an adapter typically adapts: attention, feed-forward, projections; LoCon adds resnet convs
ATTENTION = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
)
LOCON = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def pick(specs: Mapping[str, LayerSpec], suffixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in specs if n.endswith(suffixes))


def random_layers(
    specs: Mapping[str, Mapping[str, LayerSpec]],
    rank: int,
    seed: int,
    unet: tuple[str, ...] = ATTENTION,
    text: tuple[str, ...] = TEXT,
    std: float = 0.3,
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """component -> module name -> (down (r, in[, kh, kw]), up (out, r)) with random weights."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for comp, suffixes in (("unet", unet), ("text_encoder", text)):
        if comp not in specs or not suffixes:
            continue
        for name in pick(specs[comp], suffixes):
            s = specs[comp][name]
            shape = (rank, s.in_features) if s.kind == "linear" else (rank, s.in_features, *s.kernel)
            fan = s.in_features * (s.kernel[0] * s.kernel[1])
            down = torch.randn(shape, generator=g) * std / fan**0.5
            up = torch.randn(s.out_features, rank, generator=g) * std / rank**0.5
            out.setdefault(comp, {})[name] = (down, up)
    return out


def write_peft(
    path: Path,
    layers: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    rank: int,
    alpha: float,
    specs: Mapping[str, Mapping[str, LayerSpec]],
    text_model: bool = False,
) -> Path:
    """diffusers' PEFT format: unet.<module>.lora_A/lora_B.weight, alpha in lora_adapter_metadata.

    Text-encoder keys name CLIP's modules as transformers 5 does (``encoder.layers…``: what diffusers finds
    there), or with ``text_model=True`` as files made with transformers 4 do (``text_model.encoder…``)."""
    tensors, meta = {}, {}
    for comp, ls in layers.items():
        for name, (down, up) in ls.items():
            prefix = f"{comp}.{'text_model.' if comp != 'unet' and text_model else ''}{name}"
            conv = down.ndim == 4
            tensors[f"{prefix}.lora_A.weight"] = down.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = (up[:, :, None, None] if conv else up).contiguous()
        meta[f"{comp}.r"] = rank
        meta[f"{comp}.lora_alpha"] = alpha
        meta[f"{comp}.target_modules"] = sorted(ls)
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
    return path


def write_diffusers_old(
    path: Path,
    layers: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    specs: Mapping[str, Mapping[str, LayerSpec]],
) -> Path:
    """Older diffusers style: unet.<module>.lora.down/up.weight (alpha = rank)."""
    tensors = {}
    for comp, ls in layers.items():
        for name, (down, up) in ls.items():
            prefix = f"{comp}.{name}"
            conv = down.ndim == 4
            tensors[f"{prefix}.lora.down.weight"] = down.contiguous()
            tensors[f"{prefix}.lora.up.weight"] = (up[:, :, None, None] if conv else up).contiguous()
    save_file(tensors, str(path))
    return path


def write_kohya(
    path: Path,
    layers: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    alpha: float,
    specs: Mapping[str, Mapping[str, LayerSpec]],
    metadata: dict[str, str] | None = None,
) -> Path:
    """kohya / A1111: lora_unet_<module_with_underscores>.lora_down/lora_up.weight + .alpha; lora_te_ for
    the text encoder (its module names under text_model)."""
    tensors = {}
    for comp, ls in layers.items():
        for name, (down, up) in ls.items():
            stem = (
                "lora_unet_" + name.replace(".", "_")
                if comp == "unet"
                else ("lora_te_text_model_" + name.replace(".", "_"))
            )
            conv = down.ndim == 4
            tensors[f"{stem}.lora_down.weight"] = down.contiguous()
            tensors[f"{stem}.lora_up.weight"] = (up[:, :, None, None] if conv else up).contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata=metadata)
    return path


WRITERS: dict[str, Callable[..., Path]] = {"peft": write_peft, "kohya": write_kohya}
