"""CLIP text encoder of pipeline folders: same context as diffusers' encode_prompt, truncation reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from model.clip_text import CLIPTextEncoder  # noqa: E402
from model.loading import WeightsError  # noqa: E402
from tests.model.sd_helpers import build_tiny_sd, clip_tokenizer_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py

LONG = "a very detailed painting of a lighthouse on a cliff at sunset, " * 8  # well over 77 tokens


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def folder(request, tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp(request.param) / "sd", flavour=request.param)


@pytest.fixture(scope="module")
def pipe(folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )


@pytest.fixture(scope="module")
def encoder(folder) -> CLIPTextEncoder:
    return CLIPTextEncoder.load(folder / "text_encoder", folder / "tokenizer")


def test_real_clip_vocabulary():
    from transformers import CLIPTokenizer

    path, real = clip_tokenizer_dir("sd1")
    if not real:
        pytest.skip("open-clip-torch wheel unavailable: the helper fell back to a byte-level vocabulary")
    tok = CLIPTokenizer.from_pretrained(str(path))
    assert len(tok) == 49408
    # CLIP ids everybody knows: BOS, "a", "photo", "of", "an", "astronaut", EOS
    assert tok("a photo of an astronaut").input_ids == [49406, 320, 1125, 539, 550, 18376, 49407]


def _reference(pipe, prompts: list[str], clip_skip: int | None) -> torch.Tensor:
    if clip_skip is None:
        return pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    # diffusers 0.42's clip_skip path reads text_encoder.text_model, which transformers 5 no longer has;
    # its formula: final_layer_norm(hidden_states[-(clip_skip + 1)]) of the same truncated ids
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    te = pipe.text_encoder
    with torch.no_grad():
        hidden = te(ids.input_ids, output_hidden_states=True).hidden_states
        return getattr(te, "text_model", te).final_layer_norm(hidden[-(clip_skip + 1)])


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_matches_diffusers_encode_prompt(pipe, encoder, clip_skip):
    prompts = ["a photo of an astronaut riding a horse", "", LONG]
    want = _reference(pipe, prompts, clip_skip)
    info = encoder.encode_with_info(prompts, clip_skip=clip_skip)
    assert info.states.shape == want.shape == (3, 77, 32)
    assert (info.states - want).abs().max().item() <= 1e-6
    assert info.truncated == [False, False, True]
    assert info.num_tokens[:2] == [len(pipe.tokenizer(prompts[0]).input_ids), 2] and info.num_tokens[2] > 77


def test_clip_skip_changes_states_and_default(encoder, folder):
    base = encoder.encode(["a red car"])
    skipped = encoder.encode(["a red car"], clip_skip=1)
    assert (base - skipped).abs().max() > 1e-3
    assert torch.equal(encoder.encode(["a red car"], clip_skip=0), base)  # 0 = no skip
    with_default = CLIPTextEncoder.load(folder / "text_encoder", folder / "tokenizer", clip_skip=1)
    assert torch.equal(with_default.encode(["a red car"]), skipped)
    with pytest.raises(ValueError, match="clip_skip must be in"):
        encoder.encode(["x"], clip_skip=3)  # the tiny encoder has 3 layers


def test_exactly_77_tokens_is_not_truncated(encoder):
    prompt = " ".join(["cat"] * 75)  # BOS + 75 + EOS = 77
    info = encoder.encode_with_info([prompt, prompt + " cat"])
    assert info.num_tokens == [77, 78] and info.truncated == [False, True]


def test_pickle_only_text_encoder_refused(folder, tmp_path):
    copy = tmp_path / "sd"
    shutil.copytree(folder, copy)
    (copy / "text_encoder" / "model.safetensors").rename(copy / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickle.*unsafe.*convert"):
        CLIPTextEncoder.load(copy / "text_encoder", copy / "tokenizer")


def test_fp16_variant_loads(folder, tmp_path, encoder):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "sd"
    shutil.copytree(folder, copy)
    f = copy / "text_encoder" / "model.safetensors"
    half = {k: v.half() for k, v in load_file(f).items()}
    save_file(half, copy / "text_encoder" / "model.fp16.safetensors")
    f.unlink()
    enc16 = CLIPTextEncoder.load(copy / "text_encoder", copy / "tokenizer")  # fp16 weights, fp32 compute
    assert enc16.dtype == torch.float32
    a, b = enc16.encode(["a red car"]), encoder.encode(["a red car"])
    assert 0 < (a - b).abs().max().item() <= 1e-2  # rounded weights: close, not identical
