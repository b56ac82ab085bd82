"""Tiny Stable Diffusion pipeline folders for tests (CPU, seconds), written by diffusers itself.

`build_tiny_sd(root)` writes a standard diffusers folder (``StableDiffusionPipeline.save_pretrained``,
safetensors): a tiny UNet2DConditionModel (sample_size 8), a tiny AutoencoderKL with SD's factor 8 (so the
native size is 64 px), a tiny CLIPTextModel and a real CLIP tokenizer, PNDMScheduler with SD 1.5's
scheduler config. Random weights (seeded, perturbed so no path is near zero).

The tokenizer is CLIP's real BPE vocabulary (49408 tokens), built the way CLIP's SimpleTokenizer builds it
from ``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside PyPI's open-clip-torch wheel (fetched once with
``pip download``, cached in the temp dir). Without the wheel (no package index) it falls back to a
byte-level vocabulary without merges (514 tokens; still a valid CLIPTokenizer): `clip_tokenizer_dir`
reports which one it built.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path

import torch

VOCAB_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# real SD tokenizers: SD 1.x pads with EOS, SD 2.x with "!"
PAD_TOKENS = {"sd1": EOS, "sd2": "!"}
# UNET_SERVER_TEST_CACHE: where the wheel and the built tokenizers are kept (default: the temp dir)
_CACHE = Path(os.environ.get("UNET_SERVER_TEST_CACHE") or tempfile.gettempdir()) / "unet-server-clip-tok"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode map."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _bpe_merges_from_wheel() -> list[str] | None:
    """The 48894 merges of CLIP's BPE (lines 1..48894 of the gz file), from the open-clip-torch wheel."""
    wheel_dir = _CACHE / "wheel"
    wheels = sorted(wheel_dir.glob("open_clip_torch-*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "open-clip-torch", "--no-deps", "-q", "-d",
                 str(wheel_dir)],
                check=True, capture_output=True, timeout=300,
            )
        except (subprocess.SubprocessError, OSError):
            return None
        wheels = sorted(wheel_dir.glob("open_clip_torch-*.whl"))
        if not wheels:
            return None
    with zipfile.ZipFile(wheels[-1]) as zf:
        lines = gzip.decompress(zf.read(VOCAB_MEMBER)).decode("utf-8").split("\n")
    return lines[1 : 49152 - 256 - 2 + 1]  # as open_clip's SimpleTokenizer


def write_clip_tokenizer(dest: Path, pad_token: str = EOS) -> bool:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json into dest.

    Returns True for CLIP's real vocabulary, False for the byte-level fallback.
    """
    merges = _bpe_merges_from_wheel()
    real = merges is not None
    merges = merges or []
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else ""))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return real


@cache
def clip_tokenizer_dir(flavour: str = "sd1") -> tuple[Path, bool]:
    """(folder, real vocabulary?) of a CLIP tokenizer, built once per process into the temp dir."""
    dest = _CACHE / f"tokenizer-{flavour}"
    marker = dest / "real.json"
    if not marker.is_file():
        tmp = Path(tempfile.mkdtemp(dir=_CACHE.parent if _CACHE.parent.is_dir() else None))
        real = write_clip_tokenizer(tmp, PAD_TOKENS[flavour])
        (tmp / "real.json").write_text(json.dumps(real))
        _CACHE.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, dest)  # atomic: a concurrent test process either sees all files or none
        except OSError:  # another process won the race
            pass
    return dest, json.loads(marker.read_text())


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# unet/config.json of stable-diffusion-v1-5/stable-diffusion-v1-5 (as published, diffusers 0.6.0)
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# unet/config.json of stabilityai/stable-diffusion-2-1 (768-v): linear projections, 5/10/20/20 heads of 64,
# upcast attention, OpenCLIP-H context (1024)
SD21_UNET = {
    **SD15_UNET,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
# vae/config.json and text_encoder/config.json of stable-diffusion-v1-5 (CLIP ViT-L/14's text tower)
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT_ENCODER = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


def build_tiny_sd(
    root: Path,
    prediction_type: str = "epsilon",
    flavour: str = "sd1",
    scheduler: str = "PNDMScheduler",
    seed: int = 0,
) -> Path:
    """Write a tiny StableDiffusionPipeline folder at ``root`` (created) and return ``root``.

    prediction_type: "epsilon" or "v_prediction" (the scheduler config's). flavour "sd1": SD 1.x U-Net
    flags (conv projections, one head count, EOS padding); "sd2": SD 2.x flags (linear projections,
    per-block head counts, upcast_attention, "!" padding). scheduler: a diffusers scheduler class name.
    Native size 64 px (latent 8 x 8, VAE factor 8); context (B, 77, 32).
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    tok_dir, _ = clip_tokenizer_dir(flavour)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    sd2 = flavour == "sd2"
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        cross_attention_dim=32,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    _perturb(unet, seed + 1)
    _perturb(vae, seed + 2)
    sched_cls = getattr(diffusers, scheduler)
    sched = sched_cls.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type})
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    _ship_tokenizer(root, tok_dir)
    return root


def _ship_tokenizer(root: Path, tok_dir: Path) -> None:
    """The tokenizer files as the SD 1.5 / 2.1 repositories ship them (vocab.json + merges.txt), instead of
    the tokenizer.json transformers 5 writes."""
    tok_out = root / "tokenizer"
    for f in tok_out.iterdir():
        f.unlink()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (tok_out / name).write_bytes((tok_dir / name).read_bytes())


def build_sd15_random(root: Path, seed: int = 0, variant: str | None = None) -> Path:
    """A StableDiffusionPipeline folder with SD 1.5's real configs and random weights (seeded), saved in
    fp16 (as ``*.fp16.safetensors`` when variant="fp16", else as the plain files), PNDM scheduler.

    ~1.1 B parameters: takes ~1 min and ~6 GB of RAM on CPU to build, 2 GB on disk. The tokenizer is
    `clip_tokenizer_dir("sd1")` (needs the open-clip-torch wheel once; point UNET_SERVER_TEST_CACHE at a
    folder carried to machines without a package index).
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    tok_dir, _ = clip_tokenizer_dir("sd1")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(SD15_UNET).half().eval()
    vae = diffusers.AutoencoderKL.from_config(SD15_VAE).half().eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)).half().eval()
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root, safe_serialization=True, variant=variant)
    _ship_tokenizer(root, tok_dir)
    return root
