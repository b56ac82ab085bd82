"""Hub ids resolve through huggingface_hub's cache: a cache laid out by the test (blobs, snapshots, refs),
offline; what the online path asks the hub for (never a pickle); a clear error when not cached offline."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("huggingface_hub")

from model.hub import resolve_hub_id, select_weight_files  # noqa: E402
from model.pipeline import PipelineError, load_pipelines  # noqa: E402
from tests.model.sd_helpers import build_tiny_sd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py

REPO = "tiny-org/tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("built") / "tiny-sd")


def lay_out_cache(cache: Path, repo_id: str, source: Path, files: list[str] | None = None) -> Path:
    """Write `source`'s files the way huggingface_hub caches them: blobs/<sha256>, snapshots/<commit>/<path>
    as relative symlinks into blobs/, refs/main = commit. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    for rel in files if files is not None else [str(p.relative_to(source)) for p in source.rglob("*")]:
        src = source / rel
        if not src.is_file():
            continue
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_offline_from_the_cache(sd_folder, offline_cache, tmp_path):
    snap = lay_out_cache(offline_cache, REPO, sd_folder)
    assert (snap / "unet" / "config.json").is_symlink()
    weights = tmp_path / "weights"
    weights.mkdir()
    p = load_pipelines(weights, [REPO])[REPO]
    assert p.name == REPO and p.path == snap.resolve() and p.pipeline_class == "StableDiffusionPipeline"
    ref = load_pipelines(sd_folder.parent, [sd_folder.name])[sd_folder.name]
    x, ctx = torch.randn(1, 4, 8, 8), p.text_encoder.encode(["a cat"])
    assert torch.equal(ctx, ref.text_encoder.encode(["a cat"]))
    sigma = torch.tensor([1.5])
    assert torch.equal(p.denoiser(x, sigma, context=ctx), ref.denoiser(x, sigma, context=ctx))
    assert torch.equal(p.vae.decode(x), ref.vae.decode(x))


def test_not_cached_while_offline_is_a_clear_error(offline_cache, tmp_path):
    msg = r"'tiny-org/absent'.*not in the Hugging Face cache.*HF_HUB_OFFLINE"
    with pytest.raises(PipelineError, match=msg):
        load_pipelines(tmp_path, ["tiny-org/absent"])
    with pytest.raises(PipelineError, match="invalid model name"):
        load_pipelines(tmp_path, ["../x/y"])


def test_snapshot_linking_outside_its_repository_is_refused(sd_folder, offline_cache, tmp_path):
    snap = lay_out_cache(offline_cache, REPO, sd_folder)
    outside = tmp_path / "elsewhere.json"
    outside.write_text((sd_folder / "vae" / "config.json").read_text())
    (snap / "vae" / "config.json").unlink()
    (snap / "vae" / "config.json").symlink_to(outside)
    with pytest.raises(PipelineError, match="outside"):
        load_pipelines(tmp_path, [REPO])


SD15_LISTING = [  # the shape of stable-diffusion-v1-5/stable-diffusion-v1-5's file list
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin",
]


def test_weight_selection_one_set_per_component_never_pickles():
    plain = select_weight_files(SD15_LISTING, {})
    assert plain == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert select_weight_files(SD15_LISTING, {}, "fp16") == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    fp16_only = [f for f in SD15_LISTING if "fp16" in f or not f.endswith(".safetensors")]
    assert select_weight_files(fp16_only, {})[1] == "unet/diffusion_pytorch_model.fp16.safetensors"
    sharded = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
               "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model-00002-of-00002.safetensors"]
    index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    indexes = {"unet/diffusion_pytorch_model.safetensors.index.json": index}
    assert select_weight_files(sharded, indexes) == sharded[2:]


def test_online_fetch_asks_only_for_json_txt_and_one_safetensors_set(sd_folder, tmp_path, monkeypatch):
    """The hub side is a local 'remote' folder behind huggingface_hub's own pattern filter; what our code
    asks for is recorded, then the result loads offline."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    remote = tmp_path / "remote"
    shutil.copytree(sd_folder, remote)
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):  # pickles and a duplicate variant sit beside the weights
        (remote / comp / f"{stem}.bin").write_bytes(b"not to be fetched")
        shutil.copy(remote / comp / f"{stem}.safetensors", remote / comp / f"{stem}.fp16.safetensors")
    (remote / "safety_checker").mkdir()
    (remote / "safety_checker" / "model.safetensors").write_bytes(b"skip me")
    listing = sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file())
    cache = tmp_path / "cache"
    fetched: list[str] = []
    real_snapshot_download = huggingface_hub.snapshot_download

    def fake_snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None,
                               ignore_patterns=None, local_files_only=False, **kw):
        if local_files_only:  # reading the cache needs no hub: the real function
            return real_snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True
            )
        assert repo_id == REPO
        files = list(
            filter_repo_objects(listing, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        fetched.extend(files)
        return str(lay_out_cache(Path(cache_dir), repo_id, remote, files))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: listing
    )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    snap = resolve_hub_id(REPO, cache_dir=cache)
    assert fetched and all(f.endswith((".json", ".txt", ".safetensors")) for f in fetched)
    assert not any(f.startswith("safety_checker/") or ".fp16." in f for f in fetched)
    assert sorted(f for f in fetched if f.endswith(".safetensors")) == [
        "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    p = load_pipelines(tmp_path, [REPO])[REPO]
    assert p.path == snap.resolve()
