"""LoRA adapter files -> per-layer low-rank weights for a model's U-Net and text encoder(s).

Formats read (safetensors only, never pickle):

* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, the older ``lora.down`` /
  ``lora.up`` (and ``lora_linear_layer.down/up``, attention-processor ``to_q_lora.down``) styles, prefixes
  ``unet.``, ``text_encoder.``, ``text_encoder_2.`` (none = U-Net). Alpha: a ``<module>.alpha`` tensor, else
  the LoraConfig diffusers writes into the file's ``lora_adapter_metadata`` (``r``, ``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``, per component prefix), else alpha = rank (scale 1, diffusers' rule).
* kohya / A1111: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``,
  ``lora_te_`` (one text encoder), ``lora_te1_`` / ``lora_te2_`` (SDXL's two).

Layers: every ``nn.Linear`` and ``nn.Conv2d`` of the U-Net (convolutions: LoCon, down = the layer's kernel,
up = 1x1) and the text encoders' linears. A layer's update is ``ΔW = (alpha / r) · up @ down``.

Checks, each an error naming what is wrong: keys that match no layer; shapes that disagree with the model,
or metadata naming another base model family (``LoraArchitectureError``, "made for another
architecture"); LyCORIS variants (LoHa, LoKr, Tucker LoCon ``lora_mid``), DoRA and LoRA biases (refused:
not plain low-rank updates).

The model is described by its layer *specs* (``layer_specs``), so a file can be checked against a model
built on the meta device without its weights (the HTTP side does that at upload).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig JSON in the safetensors header


class LoraError(ValueError):
    """An adapter file that cannot be applied to this model (the message says why)."""


class LoraArchitectureError(LoraError):
    """An adapter made for another model architecture (the message gives the evidence)."""


@dataclass(frozen=True)
class LayerSpec:
    """What the parser needs to know of one adaptable layer."""

    kind: str  # "linear" | "conv"
    in_features: int  # in_channels for a conv
    out_features: int
    kernel: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank update: ``scale · up @ down``.

    down: (r, in) for a linear, (r, in, kh, kw) for a conv; up: (out, r); scale: alpha / r.
    """

    down: Tensor
    up: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraAdapter:
    """A parsed adapter: ``layers[component][module name] -> LoraLayer`` (module names as the model's)."""

    layers: dict[str, dict[str, LoraLayer]]
    format: str  # "peft" | "diffusers" | "kohya"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank of any layer."""
        return max((ly.rank for comp in self.layers.values() for ly in comp.values()), default=0)

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if self.layers.get(c)]

    @property
    def num_layers(self) -> int:
        return sum(len(c) for c in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(
            ly.down.numel() * ly.down.element_size() + ly.up.numel() * ly.up.element_size()
            for comp in self.layers.values()
            for ly in comp.values()
        )


# -- the model side: which layers can carry an adapter ------------------------------------------------


def _canonical(component: str, name: str) -> str:
    # transformers < 5 nests CLIP's layers under .text_model, 5.x does not; adapter files use the old names
    if component != "unet" and name.startswith("text_model."):
        return name[len("text_model.") :]
    return name


def adaptable_layers(module: nn.Module, component: str) -> dict[str, nn.Module]:
    """Module name -> layer for every ``nn.Linear`` (and, in a U-Net, ``nn.Conv2d``) of ``module``."""
    out: dict[str, nn.Module] = {}
    module = getattr(module, "_orig_mod", module)  # a torch.compile wrapper: the names of the model inside
    for name, m in module.named_modules():
        conv = isinstance(m, nn.Conv2d) and component == "unet" and m.groups == 1
        if isinstance(m, nn.Linear) or conv:
            out[_canonical(component, name)] = m
    return out


def spec_of(layer: nn.Module) -> LayerSpec:
    """The ``LayerSpec`` of an ``nn.Linear`` or ``nn.Conv2d``."""
    if isinstance(layer, nn.Linear):
        return LayerSpec("linear", layer.in_features, layer.out_features)
    assert isinstance(layer, nn.Conv2d)
    kh, kw = layer.kernel_size
    return LayerSpec("conv", layer.in_channels, layer.out_channels, (int(kh), int(kw)))


def layer_specs(modules: Mapping[str, nn.Module | None]) -> dict[str, dict[str, LayerSpec]]:
    """component -> module name -> spec, for ``{"unet": unet, "text_encoder": clip_model, ...}`` (None
    entries skipped). Works on meta-device modules."""
    return {
        comp: {n: spec_of(m) for n, m in adaptable_layers(mod, comp).items()}
        for comp, mod in modules.items()
        if mod is not None
    }


def model_family(unet_config: Any) -> str | None:
    """Family "sd1" / "sd2" / "sdxl" from a U-Net config's cross-attention width, None for other models."""
    cross = getattr(unet_config, "cross_attention_dim", None)
    if isinstance(cross, (list, tuple)):
        cross = cross[0] if cross else None
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(cross) if isinstance(cross, int) else None


# -- reading files -------------------------------------------------------------------------------------


def read_safetensors(source: str | Path | bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors on CPU, header metadata) of a safetensors file or its bytes; anything else is a LoraError.

    Pickle is never touched: a file that is not safetensors (a .ckpt/.pt zip, a pickle) fails to parse
    and is refused as such."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        if isinstance(source, bytes):
            tensors = load(source)
            meta = _header_metadata(source[: 8 + int.from_bytes(source[:8], "little")])
        else:
            tensors = load_file(str(source))
            with open(source, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                meta = _header_metadata(n.to_bytes(8, "little") + f.read(min(n, 100_000_000)))
    except (SafetensorError, ValueError, OSError, OverflowError, RuntimeError) as exc:
        raise LoraError(
            f"not a safetensors file ({exc}); adapters are accepted as .safetensors only (pickle "
            "checkpoints — .ckpt/.pt/.bin — are refused: loading them can run arbitrary code)"
        ) from None
    return tensors, meta


def _header_metadata(head: bytes) -> dict[str, str]:
    try:
        header = json.loads(head[8:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


# -- key grammar ---------------------------------------------------------------------------------------

_KOHYA = re.compile(
    r"^(lora_unet|lora_te|lora_te1|lora_te2)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
_KOHYA_COMPONENT = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}
_DIFFUSERS = re.compile(
    r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+?)\."
    r"(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight|"
    r"lora_linear_layer\.up\.weight|alpha)$"
)
# attention processors (diffusers < 0.14): <block>.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(
    r"^(?:(unet|text_encoder)\.)?(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"
)
_UNET_PROC = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_PART = {
    "lora_A.weight": "down",
    "lora.down.weight": "down",
    "lora_linear_layer.down.weight": "down",
    "lora_down.weight": "down",
    "lora_B.weight": "up",
    "lora.up.weight": "up",
    "lora_linear_layer.up.weight": "up",
    "lora_up.weight": "up",
    "alpha": "alpha",
}
_UNSUPPORTED = (
    (re.compile(r"\.hada_"), "LyCORIS LoHa (hada_*)"),
    (re.compile(r"\.lokr_"), "LyCORIS LoKr (lokr_*)"),
    (re.compile(r"\.lora_mid\."), "LyCORIS Tucker LoCon (lora_mid)"),
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA (magnitude vectors)"),
    (re.compile(r"lora_B\.bias|lora_up\.bias"), "LoRA biases"),
    (re.compile(r"\.(diff|diff_b)$"), "full weight differences (diff)"),
)
_FAMILY_WORDS = (("xl", "sdxl"), ("sd3", "sd3"), ("flux", "flux"), ("v2", "sd2"), ("v1", "sd1"))
_FAMILY_KEYS = ("ss_base_model_version", "modelspec.architecture")


@dataclass
class _Entry:
    component: str
    name: str  # the file's spelling (dots, or underscores for kohya)
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)


def _classify(key: str) -> tuple[str, str, str, str] | None:
    """(format, component, module name as spelt, part) of one key, or None when it follows no grammar."""
    m = _KOHYA.match(key)
    if m:
        return "kohya", _KOHYA_COMPONENT[m.group(1)], m.group(2), _PART[m.group(3)]
    m = _PROCESSOR.match(key)
    if m:
        comp = m.group(1) or "unet"
        table = _UNET_PROC if comp == "unet" else _TE_PROC
        return "diffusers", comp, f"{m.group(2)}.{table[m.group(3)]}", m.group(4)
    m = _DIFFUSERS.match(key)
    if m:
        fmt = "peft" if m.group(3).startswith("lora_A") or m.group(3).startswith("lora_B") else "diffusers"
        return fmt, m.group(1) or "unet", m.group(2), _PART[m.group(3)]
    return None


def _listing(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _family_in_metadata(meta: Mapping[str, str]) -> str | None:
    for key in _FAMILY_KEYS:
        value = meta.get(key, "").lower()
        for word, family in _FAMILY_WORDS:
            if word in value:
                return family
    return None


def _peft_configs(meta: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """component -> LoraConfig dict from diffusers' ``lora_adapter_metadata`` (keys prefixed by component)."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraError(f"the file's {METADATA_KEY} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, value in cfg.items():
        comp, dot, rest = key.partition(".")
        if dot and comp in COMPONENTS:
            out.setdefault(comp, {})[rest] = value
        else:
            out.setdefault("", {})[key] = value
    return out


def _pattern_value(patterns: Any, name: str) -> Any:
    """A PEFT ``alpha_pattern`` entry for module ``name`` (exact, suffix or ``^``-regex match)."""
    if not isinstance(patterns, dict):
        return None
    for pat, value in patterns.items():
        if pat.startswith("^"):
            if re.match(pat, name):
                return value
        elif name == pat or name.endswith("." + pat):
            return value
    return None


def parse_lora(
    tensors: Mapping[str, Tensor],
    specs: Mapping[str, Mapping[str, LayerSpec]],
    metadata: Mapping[str, str] | None = None,
    family: str | None = None,
    model_name: str = "this model",
    convs: bool = True,
) -> LoraAdapter:
    """Match an adapter's tensors to a model's layers; see the module docstring for formats and errors.

    ``convs=False``: adapters of convolutions with kernels larger than 1x1 (LoCon) are refused, saying so
    (1x1 convolutions, SD 1.x's attention projections, are linear layers and always accepted).

    ``specs``: component -> module name -> LayerSpec (``layer_specs``); ``family``: the model's base family
    ("sd1", "sd2", "sdxl" or None) checked against the file's kohya / modelspec metadata.
    Returns fp32 tensors on CPU.
    """
    meta = dict(metadata or {})
    if not tensors:
        raise LoraError("the file holds no tensors")
    for pattern, what in _UNSUPPORTED:
        bad = [k for k in tensors if pattern.search(k)]
        if bad:
            raise LoraError(f"{what} is not supported (only plain LoRA / LoCon): keys {_listing(bad, 3)}")
    claimed = _family_in_metadata(meta)
    if family is not None and claimed is not None and claimed != family:
        source = next(k for k in _FAMILY_KEYS if meta.get(k))
        raise LoraArchitectureError(
            f"made for another architecture: its metadata says {source}={meta[source]!r} ({claimed}), "
            f"{model_name} is {family}"
        )
    entries: dict[tuple[str, str], _Entry] = {}
    unknown: list[str] = []
    formats: set[str] = set()
    for key, value in tensors.items():
        parsed = _classify(key)
        if parsed is None:
            unknown.append(key)
            continue
        fmt, comp, name, part = parsed
        if part != "alpha":
            formats.add(fmt)
        e = entries.setdefault((comp, name), _Entry(comp, name))
        e.keys.append(key)
        if part == "alpha":
            e.alpha = float(value.float().reshape(-1)[0])
        else:
            setattr(e, part, value)
    if unknown:
        raise LoraError(f"keys in no LoRA format this server reads: {_listing(unknown)}")
    kohya = "kohya" in formats
    if len(formats - {"peft", "diffusers"}) and formats & {"peft", "diffusers"}:
        raise LoraError("the file mixes kohya (lora_unet_…) and diffusers (unet.…) keys")
    te2 = [e.keys[0] for e in entries.values() if e.component == "text_encoder_2"]
    if te2 and "text_encoder_2" not in specs:
        raise LoraArchitectureError(
            f"made for another architecture: it adapts a second text encoder ({_listing(te2, 2)}: SDXL has "
            f"two), {model_name} has {'one' if 'text_encoder' in specs else 'no CLIP text encoder'}"
        )
    tables: dict[str, dict[str, str]] = {}  # component -> spelling -> module name
    for comp, layers in specs.items():
        tables[comp] = {(n.replace(".", "_") if kohya else n): n for n in layers}
        if kohya and comp != "unet":
            tables[comp].update({"text_model_" + n.replace(".", "_"): n for n in layers})
        if not kohya and comp != "unet":
            tables[comp].update({"text_model." + n: n for n in layers})
    configs = _peft_configs(meta)
    layers_out: dict[str, dict[str, LoraLayer]] = {}
    unmatched: list[str] = []
    mismatched: list[str] = []
    no_encoder: list[str] = []
    locon: list[str] = []
    for e in entries.values():
        if e.component not in specs:
            no_encoder.append(e.keys[0])
            continue
        found = tables[e.component].get(e.name)
        if found is None:
            unmatched.extend(e.keys)
            continue
        name = found
        if e.down is None or e.up is None:
            raise LoraError(f"{e.keys[0]}: a layer needs both its down (A) and up (B) weights")
        spec = specs[e.component][name]
        if not convs and spec.kind == "conv" and spec.kernel != (1, 1):
            locon.append(e.keys[0])
            continue
        layer, problem = _shape(e, spec)
        if problem:
            mismatched.append(f"{e.component}.{name}: {problem}")
            continue
        assert layer is not None
        cfg = configs.get(e.component, configs.get("", {}))
        alpha = e.alpha
        if alpha is None and cfg:
            alpha = _pattern_value(cfg.get("alpha_pattern"), name)
            alpha = float(cfg.get("lora_alpha", layer.rank)) if alpha is None else float(alpha)
        r = layer.rank
        alpha = float(r) if alpha is None else alpha
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if cfg.get("use_dora"):
            raise LoraError("DoRA adapters (use_dora) are not supported")
        layers_out.setdefault(e.component, {})[name] = LoraLayer(layer.down, layer.up, scale)
    if no_encoder:
        raise LoraError(
            f"it adapts a text encoder ({_listing(no_encoder, 2)}) but {model_name}'s text encoder takes no "
            "LoRA (only CLIP text encoders of Stable Diffusion pipelines do)"
        )
    if locon:
        raise LoraError(
            f"it adapts {len(locon)} convolution layers (LoCon: {_listing(locon, 2)}), which this server "
            "does not adapt (UNET_SERVER_LORA_CONVS=true turns them on)"
        )
    if mismatched:
        more = f"; {len(unmatched)} keys also match no layer" if unmatched else ""
        raise LoraArchitectureError(
            f"made for another architecture: layer shapes differ from {model_name}'s: "
            f"{_listing(mismatched, 4)}{more}"
        )
    if unmatched:
        raise LoraError(f"keys that match no layer of {model_name}: {_listing(unmatched)}")
    fmt = "kohya" if kohya else ("peft" if "peft" in formats else "diffusers")
    return LoraAdapter(layers_out, fmt, meta)


def _shape(e: _Entry, spec: LayerSpec) -> tuple[LoraLayer | None, str | None]:
    """The entry's weights in canonical shapes for ``spec``, or why they do not fit."""
    assert e.down is not None and e.up is not None
    down, up = e.down.float(), e.up.float()
    if up.ndim == 4:
        if up.shape[2:] != (1, 1):
            return None, f"up weight {tuple(up.shape)} is not 1x1"
        up = up[:, :, 0, 0]
    if up.ndim != 2 or down.ndim not in (2, 4):
        return None, f"down {tuple(down.shape)} / up {tuple(up.shape)} are not LoRA weights"
    r = down.shape[0]
    if up.shape[1] != r:
        return None, f"ranks differ: down {tuple(down.shape)}, up {tuple(up.shape)}"
    if spec.kind == "linear":
        if down.ndim == 4:
            if down.shape[2:] != (1, 1):
                return None, f"a {tuple(down.shape[2:])} convolution adapter on a linear layer"
            down = down[:, :, 0, 0]
    else:
        if down.ndim == 2:
            if spec.kernel != (1, 1):
                return None, f"a linear adapter on a {spec.kernel} convolution"
            down = down[:, :, None, None]
        if tuple(down.shape[2:]) != spec.kernel:
            return None, f"kernel {tuple(down.shape[2:])} vs the layer's {spec.kernel}"
    if down.shape[1] != spec.in_features or up.shape[0] != spec.out_features:
        return None, (
            f"file {down.shape[1]} -> {up.shape[0]} features, model {spec.in_features} -> {spec.out_features}"
        )
    return LoraLayer(down.contiguous(), up.contiguous(), 1.0), None


def load_lora(
    source: str | Path | bytes,
    specs: Mapping[str, Mapping[str, LayerSpec]],
    family: str | None = None,
    model_name: str = "this model",
    convs: bool = True,
) -> LoraAdapter:
    """Read a safetensors adapter (path or bytes) and match it to ``specs`` (see ``parse_lora``)."""
    tensors, meta = read_safetensors(source)
    return parse_lora(tensors, specs, meta, family, model_name, convs)


def merged_delta(layer: LoraLayer) -> Tensor:
    """ΔW of one layer, shaped like the layer's weight: (out, in) or (out, in, kh, kw) (for tests/tools)."""
    down = layer.down.reshape(layer.rank, -1)  # (r, in·kh·kw)
    delta = layer.scale * (layer.up @ down)  # (out, in·kh·kw)
    return delta.reshape(layer.up.shape[0], *layer.down.shape[1:])
