"""Diffusers-layout folders <-> modules: config.json + diffusion_pytorch_model.safetensors (or sharded, or a
variant such as diffusion_pytorch_model.fp16.safetensors) for the U-Net, ControlNet and VAE (AutoencoderKL).

Strict: missing or unexpected keys and shape mismatches are errors naming the keys. safetensors only —
pickle checkpoints (.bin/.ckpt/.pt/.pth) are refused, never unpickled. The module is built on the meta
device and the file tensors are assigned in place, so only one copy of the weights is ever in memory.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model.attention import head_dims, select_backend, set_attention_backend
from model.config import CONTROLNET, ControlNetConfig, UNetConfig, VAEConfig
from model.controlnet import ControlNet
from model.unet import UNet
from model.vae import AutoencoderKL

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

# Old diffusers UNet2DModel attention blocks: attentions.N.{query,key,value,proj_attn} -> Attention names.
_LEGACY_ATTN = re.compile(r"(attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class WeightsError(ValueError):
    """A weights folder or file that cannot be loaded (wrong keys/shapes, unsafe format, not a model)."""


def _refuse_pickle(path: Path) -> WeightsError:
    return WeightsError(
        f"refusing to load {path}: pickle checkpoints ({'/'.join(PICKLE_SUFFIXES)}) are unsafe — unpickling "
        "can execute arbitrary code. Only safetensors is accepted; convert it in a sandbox first, e.g. "
        "`Pipeline.from_pretrained(path).save_pretrained(out, safe_serialization=True)` with diffusers (or "
        "`model.save_pretrained(out, safe_serialization=True)` for one component), or the Hub's "
        "`convert` space (https://huggingface.co/spaces/safetensors/convert)."
    )


def read_config(path: str | Path) -> dict:
    """The config.json dict of a model folder; clear errors for anything that is not one."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if folder.is_file():
        if folder.suffix.lower() in PICKLE_SUFFIXES:
            raise _refuse_pickle(folder)
        raise WeightsError(
            f"{folder} is a file; pass the model folder holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        if (folder / "model_index.json").is_file():
            raise WeightsError(
                f"{folder} is a pipeline folder (model_index.json); pass its unet/ or controlnet/ subfolder"
            )
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise WeightsError(f"{folder} is not a model folder: no {CONFIG_NAME} (found: {found})")
    try:
        d = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise WeightsError(f"{cfg_path} is not a JSON object")
    return d


def _index_files(folder: Path, index: Path) -> list[Path]:
    """The shard files an index.json names (all present, none a pickle)."""
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index} has no weight_map")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for f in files:
        if f.suffix.lower() in PICKLE_SUFFIXES:
            raise _refuse_pickle(f)
        if not f.is_file():
            raise WeightsError(f"{index} names {f.name}, which is missing")
    return files


def _variants(folder: Path, stem: str) -> list[str]:
    """Weight variants present in `folder` (e.g. ["fp16"]) for `stem`, fp16 first."""
    found = set()
    for p in folder.glob(f"{stem}.*.safetensors"):
        found.add(p.name[len(stem) + 1 : -len(".safetensors")])
    for p in folder.glob(f"{stem}.safetensors.index.*.json"):
        found.add(p.name[len(stem) + len(".safetensors.index.") : -len(".json")])
    found.discard("")
    return sorted(found, key=lambda v: (v != "fp16", v))


def find_weights(
    folder: str | Path, stem: str = "diffusion_pytorch_model", variant: str | None = None
) -> tuple[list[Path], str | None]:
    """The safetensors files of one model folder and the variant they are: (files, variant or None).

    Looks for ``{stem}.safetensors`` or a sharded ``{stem}.safetensors.index.json``, and diffusers'
    variants ``{stem}.{variant}.safetensors`` / ``{stem}.safetensors.index.{variant}.json`` (e.g. fp16).
    ``variant`` given: that variant first, then the plain files; None: the plain files first, then any
    variant present (fp16 preferred). A folder with only pickle files (.bin/.ckpt/...) is refused with a
    message saying how to convert it; nothing is ever unpickled.
    """
    folder = Path(folder)

    def plain() -> list[Path] | None:
        single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            return [single]
        return _index_files(folder, index) if index.is_file() else None

    def of(v: str) -> list[Path] | None:
        single, index = folder / f"{stem}.{v}.safetensors", folder / f"{stem}.safetensors.index.{v}.json"
        if single.is_file():
            return [single]
        return _index_files(folder, index) if index.is_file() else None

    order: list[str | None] = [variant, None] if variant else [None, *_variants(folder, stem)]
    for v in order:
        files = of(v) if v else plain()
        if files:
            return files, v
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise _refuse_pickle(pickles[0])
    raise WeightsError(
        f"{folder} is not a model folder: no {stem}.safetensors or {stem}.safetensors.index.json"
    )


def _weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of a diffusers model folder (single file, shards of an index, or a variant)."""
    files, found = find_weights(folder, "diffusion_pytorch_model", variant)
    if found:
        log.info("%s: loading the %s weights variant", folder, found)
    return files


def _rename_legacy(key: str) -> str:
    return _LEGACY_ATTN.sub(lambda m: m.group(1) + _LEGACY_NAMES[m.group(2)] + ".", key)


def _check_keys(model: nn.Module, shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """Raise WeightsError naming missing/unexpected keys and shape mismatches."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        f"{k}: file {shapes[k]} vs model {expected[k]}"
        for k in sorted(set(expected) & set(shapes))
        if shapes[k] != expected[k]
    ]
    problems = []
    for what, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", wrong),
    ):
        if items:
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            problems.append(f"{what}: {', '.join(items[:10])}{more}")
    if problems:
        raise WeightsError(f"weights in {where} do not match config.json: " + "; ".join(problems))


M = TypeVar("M", bound=nn.Module)


def _load(
    model_cls: type[M],
    config: UNetConfig | ControlNetConfig | VAEConfig,
    folder: Path,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    attention_backend: str | None,
    variant: str | None = None,
) -> M:
    device = torch.device(device if device is not None else "cpu")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    files = _weight_files(folder, variant)
    with torch.device("meta"):
        model = model_cls(config)
    # Read shapes first so a bad file fails before any tensor is copied.
    shapes: dict[str, tuple[int, ...]] = {}
    names: dict[str, tuple[Path, str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                keys = {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
        except Exception as e:  # safetensors raises its own error type for a corrupt/non-safetensors file
            raise WeightsError(f"{f} is not a readable safetensors file: {e}") from e
        for k, shape in keys.items():
            new = _rename_legacy(k)
            if new in shapes:
                raise WeightsError(f"key {new} appears twice in {folder}")
            shapes[new], names[new] = shape, (f, k)
    _check_keys(model, shapes, folder)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for new, (src, k) in names.items():
                if src == f:
                    t = sf.get_tensor(k)
                    state[new] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit it
    model.eval()
    backend = select_backend(device, dtype, attention_backend, head_dims(model))
    set_attention_backend(model, backend)
    # UNet, ControlNet and AutoencoderKL declare `attention_backend: str`; torch types Module.__setattr__'s
    # value as Tensor | Module, but a plain attribute is what it stores.
    model.attention_backend = backend  # type: ignore[assignment]
    return model


def load_unet(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attention_backend: str | None = None,
    variant: str | None = None,
) -> UNet:
    """Load a diffusers UNet2DModel / UNet2DConditionModel folder as an eval-mode `UNet`.

    device default CPU; dtype default fp16 on CUDA, fp32 elsewhere; channels_last on CUDA.
    attention_backend: force "xformers" | "sdpa" | "math" (raises if it cannot run); None picks the first
    that works. The choice is in `unet.attention_backend`. variant: weights variant to prefer ("fp16"; see
    `find_weights`: without one the plain file is used, else any variant present).
    """
    folder = Path(path)
    d = read_config(folder)
    if d.get("_class_name") == CONTROLNET:
        raise WeightsError(f"{folder} holds a ControlNetModel; use load_controlnet")
    return _load(UNet, UNetConfig.from_dict(d), folder, device, dtype, attention_backend, variant)


def load_controlnet(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attention_backend: str | None = None,
    variant: str | None = None,
) -> ControlNet:
    """Load a diffusers ControlNetModel folder as an eval-mode `ControlNet` (conventions as load_unet)."""
    folder = Path(path)
    cfg = ControlNetConfig.from_dict(read_config(folder))
    return _load(ControlNet, cfg, folder, device, dtype, attention_backend, variant)


def load_vae(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attention_backend: str | None = None,
    variant: str | None = None,
) -> AutoencoderKL:
    """Load a diffusers AutoencoderKL folder (a pipeline's vae/) as an eval-mode `AutoencoderKL`.

    dtype default: fp32 on CPU; on CUDA fp32 when the config sets `force_upcast` (diffusers' default: the SD
    VAE's activations overflow fp16 at large sizes), else fp16. Other conventions as load_unet.
    """
    folder = Path(path)
    cfg = VAEConfig.from_dict(read_config(folder))
    device = torch.device(device if device is not None else "cpu")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" and not cfg.force_upcast else torch.float32
    return _load(AutoencoderKL, cfg, folder, device, dtype, attention_backend, variant)


def save_pretrained(
    module: UNet | ControlNet | AutoencoderKL, path: str | Path, max_shard_size: int | None = None
) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors (sharded with an index when the weights
    exceed `max_shard_size` bytes), loadable by diffusers' from_pretrained and load_unet/controlnet/vae."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("diffusion_pytorch_model*.safetensors*"):
        old.unlink()  # a stale index or shard set would shadow or contradict the new weights
    (folder / CONFIG_NAME).write_text(json.dumps(module.config.to_dict(), indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in state.values())
    if max_shard_size is None or total <= max_shard_size:
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder
