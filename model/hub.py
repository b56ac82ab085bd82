"""Hub ids as models: ``org/name`` -> a pipeline folder in the usual Hugging Face cache (safetensors only).

``resolve_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5")`` returns the snapshot folder
``$HF_HUB_CACHE/models--org--name/snapshots/<commit>/``, downloading what is missing with huggingface_hub's
``snapshot_download``, restricted to ``*.json``, ``*.txt`` and ``*.safetensors`` files — never pickles — and
to the components a pipeline needs (``safety_checker/``, ``feature_extractor/``, ``image_encoder/`` are
skipped). Of each component's weights only one set is fetched: the plain files when the repository has
them, else a variant (fp16), or the variant asked for.

Offline (``HF_HUB_OFFLINE=1``, read at call time) nothing is fetched: the cached snapshot of the revision
(``refs/main`` by default) is used, and a repository that is not cached is a `HubError` saying so.
The cache is ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (read at call time).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
ALLOW_PATTERNS = ("*.json", "*.txt", "*.safetensors")  # the only file types ever fetched
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
# weights file stem per library: diffusers models vs transformers models
_STEMS = ("diffusion_pytorch_model", "model")


class HubError(ValueError):
    """A hub id that cannot be resolved (not cached while offline, not found, no network)."""


def is_hub_id(name: str) -> bool:
    """True for ``org/name`` (one slash, hub-legal characters, no ``..``)."""
    return bool(HUB_ID_RE.match(name)) and ".." not in name


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub read it at import."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The hub cache folder, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def repo_folder(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/models--org--name``: the repository's storage folder (snapshots link into its blobs/)."""
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    return cache / ("models--" + repo_id.replace("/", "--"))


def _allowed(path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in ALLOW_PATTERNS)


def select_weight_files(
    repo_files: list[str],
    indexes: dict[str, dict],
    variant: str | None = None,
    components: set[str] | None = None,
) -> list[str]:
    """Which ``.safetensors`` files of a repository listing to fetch: one set per component folder.

    repo_files: every path in the repository; indexes: the already fetched ``*.safetensors.index*.json``
    contents by path. Per component (a top-level folder not in SKIPPED_COMPONENTS; with ``components``,
    only those: the ones model_index.json names, so SDXL's extra ``vae_1_0/`` is not fetched) the set is
    the one `model.loading.find_weights` would load: the plain file or index shards, else a variant ("fp16"
    first); ``variant`` given: that variant first.
    """
    present = set(repo_files)
    folders = {p.split("/", 1)[0] for p in repo_files if "/" in p} - set(SKIPPED_COMPONENTS)
    if components is not None:
        folders &= components
    components_list = sorted(folders)
    chosen: list[str] = []
    for comp in components_list:
        for stem in _STEMS:
            base = f"{comp}/{stem}"
            variants = sorted(
                {
                    p[len(base) + 1 : -len(".safetensors")]
                    for p in present
                    if p.startswith(base + ".") and p.endswith(".safetensors") and p.count("/") == 1
                }
                | {
                    p[len(base) + len(".safetensors.index.") : -len(".json")]
                    for p in present
                    if p.startswith(base + ".safetensors.index.") and p.endswith(".json")
                },
                key=lambda v: (v != "fp16", v),
            )
            order = [variant, None] if variant else [None, *variants]
            for v in order:
                single = f"{base}.{v}.safetensors" if v else f"{base}.safetensors"
                index = f"{base}.safetensors.index.{v}.json" if v else f"{base}.safetensors.index.json"
                if single in present:
                    chosen.append(single)
                    break
                if index in present and index in indexes:
                    shards = sorted(set(indexes[index].get("weight_map", {}).values()))
                    chosen.extend(f"{comp}/{s}" for s in shards if s.endswith(".safetensors"))
                    break
    return [p for p in chosen if _allowed(p)]


def _index_components(snapshot: Path) -> set[str] | None:
    """The component folders model_index.json names (None without a readable one: every folder)."""
    try:
        index = json.loads((snapshot / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict):
        return None
    return {k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1]}


def resolve_hub_id(
    repo_id: str,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """The local snapshot folder of hub pipeline ``repo_id`` (see the module docstring); raises HubError."""
    if not is_hub_id(repo_id):
        raise HubError(f"{repo_id!r} is not a hub id (expected 'org/name')")
    try:
        import huggingface_hub
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - the text extra installs it
        raise HubError("hub ids need huggingface_hub (pip install 'unet-server[text]')") from exc
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    revision = revision or "main"
    if hub_offline():
        try:
            path = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True)
        except Exception as exc:  # LocalEntryNotFoundError and its relatives across hub versions
            raise HubError(
                f"hub model {repo_id!r} (revision {revision}) is not in the Hugging Face cache {cache} and "
                "HF_HUB_OFFLINE is set, so it cannot be downloaded. Download it where the hub can be reached "
                f"(e.g. `hf download {repo_id} --include '*.json' '*.txt' '*.safetensors'` with "
                "HF_HUB_CACHE pointing at this cache), or unset HF_HUB_OFFLINE."
            ) from exc
        return Path(path)
    skip = [f"{c}/*" for c in SKIPPED_COMPONENTS]
    try:
        # 1. configs, tokenizer files and shard indexes (falls back to the cache if the hub is unreachable)
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache),
            allow_patterns=["*.json", "*.txt"],
            ignore_patterns=skip,
        )
    except Exception as exc:
        raise HubError(f"could not fetch hub model {repo_id!r} (revision {revision}): {exc}") from exc
    commit = Path(path).name  # the snapshot folder is named by its commit: pin it for step 2
    try:
        files = huggingface_hub.HfApi().list_repo_files(repo_id, revision=commit)
    except Exception as exc:
        log.warning("hub unreachable for %s (%s); using the cached snapshot %s", repo_id, exc, path)
        return Path(path)
    indexes = {
        p: json.loads((Path(path) / p).read_text())
        for p in files
        if ".safetensors.index" in p and p.endswith(".json") and (Path(path) / p).is_file()
    }
    weights = select_weight_files(files, indexes, variant, _index_components(Path(path)))
    try:
        # 2. one set of safetensors per component
        if weights:
            path = snapshot_download(repo_id, revision=commit, cache_dir=str(cache), allow_patterns=weights)
    except Exception as exc:
        raise HubError(f"could not fetch the weights of hub model {repo_id!r}: {exc}") from exc
    log.info("hub model %s resolved to %s", repo_id, path)
    return Path(path)
