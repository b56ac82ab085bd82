"""The LoRA adapter registry: ``<name>.safetensors`` files in one folder, listed, uploaded, checked, deleted.

The folder is ``UNET_SERVER_LORA_DIR``, by default ``loras/`` in the weights directory (model listing ignores
it: it holds no model folder). Names follow the model-folder rule (``model.pipeline``: letters, digits,
``.``, ``_``, ``-``, at most 128 characters, not starting with a dot or dash). Files are safetensors only
and at most ``UNET_SERVER_LORA_MAX_UPLOAD_BYTES``.

An adapter is checked against a served model with ``model.lora.parse_lora`` on the file's *header* (key
names and shapes: a meta tensor per weight, the alpha scalars read for real) and the model's layer specs,
taken from a copy of its U-Net and CLIP text encoder built on the meta device from the folder's configs:
no weights are loaded on the serving side, and a check costs a header read. Results are cached per (file
digest, model).

No torch work on the event loop: callers run ``add``, ``check`` and ``info`` in a thread (routes do).
The engine side (device pages, LRU, loading) is ``server.lora_slots``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.lora import LayerSpec, LoraAdapter, LoraError, model_family, parse_lora
from model.pipeline import _NAME_RE

SUFFIX = ".safetensors"
CONVS_AUTO_PARAMS = 100_000_000  # "auto" LoCon below this many U-Net parameters


class LoraSettings(BaseSettings):
    """LoRA settings (env ``UNET_SERVER_LORA_<NAME>``), read by both the server and the engine process."""

    model_config = SettingsConfigDict(env_prefix="UNET_SERVER_LORA_", extra="ignore")

    # Per-row adapters on/off (off: no hooks, no LoRA graphs, requests naming adapters are refused).
    enabled: bool = True
    # Adapter folder; None = <weights_dir>/loras.
    dir: Path | None = None
    # Largest adapter file accepted by POST /v1/loras.
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    # Device pages per adapted layer, beyond the zero page; an adapter of rank r takes ceil(r / page_rank).
    pages: int = Field(16, ge=1)
    # Rank columns per page.
    page_rank: int = Field(16, ge=1)
    # Pages one row may use: the rank budget of a request's adapters together is row_pages * page_rank.
    row_pages: int = Field(4, ge=1)
    # Adapters one request may name.
    max_per_request: int = Field(4, ge=1)
    # Adapt the U-Net's 3x3 convolutions too (LoCon files): "true", "false", or "auto" = for U-Nets under
    # CONVS_AUTO_PARAMS parameters (the shipped models) and not for SD-sized ones, where their pages cost
    # in·kh·kw per rank column and every pass with adapters runs the grouped convolutions. 1x1 convolutions
    # (SD 1.x attention projections) are linear layers and always adapted.
    convs: Literal["auto", "true", "false"] = "auto"

    def convs_for(self, unet_parameters: int) -> bool:
        """Whether a U-Net of that many parameters gets LoCon tables."""
        if self.convs == "auto":
            return unet_parameters < CONVS_AUTO_PARAMS
        return self.convs == "true"

    # Parsed adapters kept in host memory (evicted from device pages, reloaded from here without disk).
    host_cache_bytes: int = Field(4 * 1024**3, ge=0)


class LoraNotFound(LookupError):
    """No adapter of that name."""


class LoraConflict(ValueError):
    """The name is taken (upload) or in use by a queued or running request (delete)."""


class LoraTooLarge(ValueError):
    """An upload past the size cap."""


@dataclass(frozen=True)
class LoraFileInfo:
    """An adapter file as the registry lists it."""

    name: str
    bytes: int
    sha256: str
    format: str  # "peft" | "diffusers" | "kohya"
    rank: int
    components: list[str]
    num_layers: int
    models: dict[str, str | None] = field(default_factory=dict)  # served model -> None (fits) or why not

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "object": "lora",
            "bytes": self.bytes,
            "sha256": self.sha256,
            "format": self.format,
            "rank": self.rank,
            "components": self.components,
            "layers": self.num_layers,
            "models": sorted(m for m, why in self.models.items() if why is None),
            "incompatible": {m: why for m, why in sorted(self.models.items()) if why is not None},
        }


def check_name(name: str) -> None:
    """ValueError unless ``name`` follows the model-folder naming rule."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(SUFFIX):
        raise ValueError(
            f"invalid adapter name {name!r}: 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit, without the {SUFFIX} suffix"
        )


def header_tensors(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """(key -> meta tensor of the stored shape, with alpha scalars read for real; header metadata) of a
    safetensors file's bytes (the whole file or at least its header and the alpha tensors). LoraError when
    it is not safetensors."""
    import torch

    def refuse(why: str) -> LoraError:
        return LoraError(
            f"not a safetensors file ({why}); adapters are accepted as .safetensors only (pickle checkpoints "
            "— .ckpt/.pt/.bin — are refused: loading them can run arbitrary code)"
        )

    if len(data) < 8:
        raise refuse("too short")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > 100_000_000:
        raise refuse("bad header length")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise refuse("no JSON header") from None
    if not isinstance(header, dict):
        raise refuse("header is not an object")
    meta = header.pop("__metadata__", None) or {}
    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    out: dict[str, Any] = {}
    start = 8 + n
    for key, entry in header.items():
        if not isinstance(entry, dict) or "shape" not in entry or not isinstance(entry.get("dtype"), str):
            raise refuse(f"bad header entry {key!r}")
        shape = entry["shape"]
        # a shape torch.empty takes (non-negative ints, no bools) and whose byte size does not overflow
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**31 for d in shape):
            raise refuse(f"bad shape of {key!r}")
        if math.prod(shape) >= 2**48:
            raise refuse(f"bad shape of {key!r}")
        dtype = dtypes.get(entry["dtype"], torch.float32)
        if key.endswith(".alpha"):  # a scalar whose value the parse needs: read just its bytes
            offsets = entry.get("data_offsets", (0, 0))
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(v) is int for v in offsets):
                raise refuse(f"bad alpha tensor {key!r}")
            a, b = offsets
            raw = bytearray(data[start + a : start + b])
            if entry["dtype"] not in dtypes or len(raw) != dtype.itemsize:
                raise refuse(f"bad alpha tensor {key!r}")
            out[key] = torch.frombuffer(raw, dtype=dtype).clone()
            continue
        out[key] = torch.empty(shape, dtype=dtype, device="meta")
    return out, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _meta_specs(weights_dir: Path, model: str) -> tuple[dict[str, dict[str, LayerSpec]], str | None, int]:
    """Layer specs, family and U-Net parameter count of a served model, from meta-device copies built from
    its folder's configs."""
    import torch

    from model.config import UNetConfig
    from model.loading import read_config
    from model.lora import layer_specs
    from model.pipeline import model_folder, read_metadata
    from model.unet import UNet

    meta = read_metadata(weights_dir, model)
    if meta.get("base_model") and not meta.get("pipeline_class"):
        return _meta_specs(weights_dir, str(meta["base_model"]))
    folder, _ = model_folder(weights_dir, model)
    config = UNetConfig.from_dict(read_config(folder / "unet"))
    modules: dict[str, Any] = {}
    with torch.device("meta"):
        modules["unet"] = UNet(config)
        if meta.get("pipeline_class"):
            from transformers import CLIPTextConfig, CLIPTextModel

            for comp in ("text_encoder", "text_encoder_2"):
                if (folder / comp / "config.json").is_file():
                    cfg = CLIPTextConfig.from_pretrained(str(folder / comp), local_files_only=True)
                    modules[comp] = CLIPTextModel(cfg)
    params = sum(p.numel() for p in modules["unet"].parameters())
    return layer_specs(modules), model_family(config), params


class LoraRegistry:
    """The adapter folder (thread-safe; file work off the event loop)."""

    def __init__(self, root: Path, weights_dir: Path, max_upload_bytes: int, convs: str = "auto") -> None:
        self.root = Path(root)
        self.convs = convs  # UNET_SERVER_LORA_CONVS, as the engine reads it
        self.weights_dir = Path(weights_dir)
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()
        self._specs: dict[str, tuple[dict[str, dict[str, LayerSpec]], str | None, int]] = {}
        self._checks: dict[tuple[str, str], str | None] = {}  # (sha256, model) -> None or why not
        self._infos: dict[str, tuple[tuple[int, int], LoraFileInfo]] = {}  # name -> ((size, mtime), info)

    def path(self, name: str) -> Path:
        check_name(name)
        return self.root / f"{name}{SUFFIX}"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name[: -len(SUFFIX)]
            for p in self.root.iterdir()
            if p.name.endswith(SUFFIX) and _NAME_RE.match(p.name[: -len(SUFFIX)]) and p.is_file()
        )

    def specs(self, model: str) -> tuple[dict[str, dict[str, LayerSpec]], str | None, int]:
        with self._lock:
            cached = self._specs.get(model)
        if cached is None:
            cached = _meta_specs(self.weights_dir, model)
            with self._lock:
                self._specs[model] = cached
        return cached

    def _parse(self, data: bytes, model: str) -> LoraAdapter:
        tensors, meta = header_tensors(data)
        specs, family, params = self.specs(model)
        convs = LoraSettings(convs=self.convs).convs_for(params)
        return parse_lora(tensors, specs, meta, family, f"model {model!r}", convs)

    def _describe(self, name: str, data: bytes, models: Iterable[str]) -> LoraFileInfo:
        """Check ``data`` against every model; LoraError when it is not an adapter file at all."""
        header_tensors(data)  # not safetensors: said as such, before any model is tried
        sha = hashlib.sha256(data).hexdigest()
        fits: dict[str, str | None] = {}
        parsed: LoraAdapter | None = None
        for model in models:
            try:
                adapter = self._parse(data, model)
            except LoraError as exc:
                fits[model] = str(exc)
                continue
            fits[model] = None
            parsed = parsed or adapter
        with self._lock:
            self._checks.update({(sha, m): why for m, why in fits.items()})
        if parsed is None:
            return LoraFileInfo(name, len(data), sha, "unknown", 0, [], 0, fits)
        return LoraFileInfo(
            name, len(data), sha, parsed.format, parsed.rank, parsed.components, parsed.num_layers, fits
        )

    def info(self, name: str, models: Iterable[str]) -> LoraFileInfo:
        """The adapter's description, checked against ``models`` (cached by file size and mtime)."""
        path = self.path(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise LoraNotFound(f"no adapter named {name!r}") from None
        models = list(models)
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._infos.get(name)
        if cached is not None and cached[0] == stamp and set(models) <= set(cached[1].models):
            return cached[1]
        info = self._describe(name, path.read_bytes(), models)
        with self._lock:
            self._infos[name] = (stamp, info)
        return info

    def list(self, models: Iterable[str]) -> list[LoraFileInfo]:
        models = list(models)
        out = []
        for name in self.names():
            try:
                out.append(self.info(name, models))
            except (LoraError, LoraNotFound):
                continue  # a broken or vanished file is not listed
        return out

    def check(self, name: str, model: str) -> str:
        """The file digest of adapter ``name`` when it fits ``model``; LoraNotFound / LoraError (why not)."""
        info = self.info(name, [model])
        why = info.models.get(model)
        if why is not None:
            raise LoraError(why)
        return info.sha256

    def add(self, name: str, data: bytes, models: Iterable[str]) -> LoraFileInfo:
        """Store an uploaded adapter: name rule, size cap, safetensors, fits at least one served model, name
        not taken. Written to a temporary file and linked into place (no partial file is ever visible)."""
        check_name(name)
        if len(data) > self.max_upload_bytes:
            raise LoraTooLarge(f"{len(data)} bytes exceeds the cap of {self.max_upload_bytes} bytes")
        models = list(models)
        if self.path(name).exists():
            raise LoraConflict(f"an adapter named {name!r} exists; delete it first or pick another name")
        info = self._describe(name, data, models)
        if info.models and all(why is not None for why in info.models.values()):
            reasons = "; ".join(f"{m}: {why}" for m, why in sorted(info.models.items()))
            raise LoraError(f"the adapter fits no served model ({reasons})")
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, self.path(name))  # fails if the name appeared meanwhile: never overwrite
            except FileExistsError:
                raise LoraConflict(f"an adapter named {name!r} exists") from None
        finally:
            os.unlink(tmp)
        return self.info(name, models)

    def delete(self, name: str) -> None:
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise LoraNotFound(f"no adapter named {name!r}") from None
        with self._lock:
            self._infos.pop(name, None)


_registries: dict[tuple[Path, Path], LoraRegistry] = {}
_registries_lock = threading.Lock()


def lora_dir(weights_dir: Path, settings: LoraSettings | None = None) -> Path:
    """The adapter folder: UNET_SERVER_LORA_DIR or <weights_dir>/loras."""
    s = settings or LoraSettings()
    return Path(s.dir) if s.dir is not None else Path(weights_dir) / "loras"


def _weights_dir(settings: Any) -> Path:
    """``server.loading.resolve_weights_dir`` (the same rule; not imported: server.loading imports this
    module): a relative weights dir that does not exist here is the one beside the packages."""
    weights_dir = Path(settings.weights_dir)
    if not weights_dir.exists() and not weights_dir.is_absolute():
        beside = Path(__file__).resolve().parents[1] / weights_dir
        if beside.is_dir():
            return beside
    return weights_dir


def registry_for(settings: Any) -> LoraRegistry:
    """The registry of a server's ``Settings`` (one per adapter folder and weights dir, built once)."""
    lora_settings = LoraSettings()
    weights_dir = _weights_dir(settings).resolve()
    root = lora_dir(weights_dir, lora_settings)
    with _registries_lock:
        reg = _registries.get((root, weights_dir))
        s = lora_settings
        if reg is None or (reg.max_upload_bytes, reg.convs) != (s.max_upload_bytes, s.convs):
            reg = LoraRegistry(root, weights_dir, s.max_upload_bytes, s.convs)
            _registries[(root, weights_dir)] = reg
    return reg
