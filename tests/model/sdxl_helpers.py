"""SDXL pipeline folders for tests and benchmarks, written by diffusers itself (StableDiffusionXLPipeline).

`build_tiny_sdxl(root)`: a tiny random SDXL folder (CPU, seconds): the SDXL U-Net layout (DownBlock2D first,
per-block transformer depths, linear projections, text_time micro-conditioning), a tiny AutoencoderKL with
factor 8 and SDXL's scaling factor (native size 64 px), CLIPTextModel + CLIPTextModelWithProjection with
CLIP's tokenizers (tokenizer pads with EOS, tokenizer_2 with "!", as SDXL's), EulerDiscreteScheduler with
SDXL's scheduler config. `build_sdxl_random(root)`: the real SDXL base configs (2.6 B U-Net parameters) with
random weights, for the GPU benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.model.sd_helpers import SD15_TEXT_ENCODER, _perturb, _ship_tokenizer, clip_tokenizer_dir

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# unet/config.json of stable-diffusion-xl-base-1.0 (as published, diffusers 0.19.0.dev0)
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
# vae/config.json of stable-diffusion-xl-base-1.0
SDXL_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# text_encoder/ (CLIP ViT-L/14) and text_encoder_2/ (OpenCLIP ViT-bigG/14, with projection) configs
SDXL_TEXT_ENCODER = {**SD15_TEXT_ENCODER, "projection_dim": 768}
SDXL_TEXT_ENCODER_2 = {
    **SD15_TEXT_ENCODER,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}


def _save(pipe: object, root: Path, variant: str | None = None, force_zeros: bool = True) -> Path:
    pipe.save_pretrained(root, safe_serialization=True, variant=variant)  # type: ignore[attr-defined]
    _ship_tokenizer(root, clip_tokenizer_dir("sd1")[0])
    tok2 = root / "tokenizer_2"
    for f in tok2.iterdir():
        f.unlink()
    src = clip_tokenizer_dir("sd2")[0]  # SDXL's tokenizer_2 pads with "!"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (tok2 / name).write_bytes((src / name).read_bytes())
    index = json.loads((root / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] == force_zeros
    return root


def build_tiny_sdxl(root: Path, seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> Path:
    """Write a tiny StableDiffusionXLPipeline folder at ``root`` and return it: native size 64 px (latent
    8 x 8), context (B, 77, 32 + 32), pooled text embeds (B, 16), 6 time ids x 8 channels."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(root)
    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir("sd1")[0]), local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir("sd2")[0]), local_files_only=True)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
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
        scaling_factor=0.13025,
        force_upcast=True,
    )

    def clip_config(t: CLIPTokenizer, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(t),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=t.bos_token_id,
            eos_token_id=t.eos_token_id,
            pad_token_id=t.pad_token_id,
            hidden_act=act,
            projection_dim=16,
        )

    text_encoder = CLIPTextModel(clip_config(tok, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(tok2, "gelu"))
    _perturb(unet, seed + 1)
    _perturb(vae, seed + 2)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet.eval(),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )
    return _save(pipe, root, force_zeros=force_zeros_for_empty_prompt)


def build_sdxl_random(root: Path, seed: int = 0, variant: str | None = "fp16") -> Path:
    """A StableDiffusionXLPipeline folder with SDXL base's real configs and random weights (seeded), saved
    in fp16 (``*.fp16.safetensors`` by default). ~3.5 B parameters: build it on a machine with ~16 GB of RAM
    (a GPU host); ~7 GB on disk. diffusers' own initialisation (as `build_sd15_random`)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(root)
    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir("sd1")[0]), local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir("sd2")[0]), local_files_only=True)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(SDXL_UNET).half().eval()
    vae = diffusers.AutoencoderKL.from_config(SDXL_VAE).half().eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER)).half().eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2)).half().eval()
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
    )
    return _save(pipe, root, variant=variant)
