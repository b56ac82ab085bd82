"""LoRA parity with diffusers + PEFT on a tiny Stable Diffusion pipeline (CPU, fp32, ≤ 1e-4).

Same folder, same adapter files. Theirs: ``StableDiffusionPipeline.load_lora_weights`` per adapter, then
``set_adapters([...], weights)``. Ours: ``model.lora.load_lora`` into a ``model.lora_batched.LoraBank``'s
pages; several rows with *different* adapter sets in one batched forward pass, each row compared with
diffusers run on that row alone with that row's adapters. Adapters: one in diffusers' PEFT format (alpha
in the file's LoraConfig metadata; attention + feed-forward + projections + text encoder), one kohya
(``lora_unet_…``/``lora_te_…`` with ``.alpha``; LoCon resnet convolutions and time projections, rank 6
over pages of 4), one in the older ``lora.down``/``lora.up`` style.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from model.lora import LoraArchitectureError, LoraError, layer_specs, load_lora, model_family  # noqa: E402
from model.lora_batched import LoraBank  # noqa: E402
from model.pipeline import load_pipelines  # noqa: E402
from tests.model.lora_helpers import (  # noqa: E402
    ATTENTION,
    LOCON,
    random_layers,
    write_diffusers_old,
    write_kohya,
    write_peft,
)
from tests.model.sd_helpers import build_tiny_sd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py

TOL = 1e-4
PROMPTS = ["a red dress on a hanger", "striped socks"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    folder = build_tiny_sd(root / "tiny-sd1", "epsilon", flavour="sd1")
    ours = load_pipelines(root, [folder.name])[folder.name]
    specs = layer_specs({"unet": ours.unet, "text_encoder": ours.text_encoder.model})
    files = {
        "peft": write_peft(root / "a.safetensors", random_layers(specs, 4, seed=1), 4, 8.0, specs),
        "kohya": write_kohya(
            root / "b.safetensors", random_layers(specs, 6, seed=2, unet=ATTENTION + LOCON), 3.0, specs
        ),
        "old": write_diffusers_old(root / "c.safetensors", random_layers(specs, 4, seed=3, text=()), specs),
    }
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    base = _theirs_outputs(theirs)  # before any adapter is loaded
    for name, path in files.items():
        theirs.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    return ours, theirs, specs, files, base


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([417.0])


def _theirs_outputs(pipe) -> dict[str, torch.Tensor]:
    """Text states (P, 77, D) and the U-Net output on the first prompt, with the active adapters."""
    tok = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = pipe.text_encoder(tok.input_ids)[0]
        x, t = _inputs()
        eps = pipe.unet(x, t, encoder_hidden_states=states[:1]).sample
    return {"states": states, "eps": eps}


def _theirs(pipe, names: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    pipe.enable_lora()
    pipe.set_adapters(names, adapter_weights=weights)
    return _theirs_outputs(pipe)


@pytest.fixture(scope="module")
def bank(setup):
    ours, _, specs, files, _ = setup
    bank = LoraBank(
        {"unet": ours.unet, "text_encoder": ours.text_encoder.model},
        pages=8,
        page_rank=4,
        row_pages=4,
        max_rows=8,
    )
    family = model_family(ours.unet.config)
    pages = {"peft": [1], "kohya": [2, 3], "old": [4]}
    for name, path in files.items():
        adapter = load_lora(path, specs, family)
        assert bank.pages_for(adapter) == len(pages[name])
        bank.write(pages[name], adapter)
    yield bank, pages
    bank.remove()


def test_formats_parse(setup) -> None:
    _, _, specs, files, _ = setup
    formats = {name: load_lora(path, specs).format for name, path in files.items()}
    assert formats == {"peft": "peft", "kohya": "kohya", "old": "diffusers"}
    kohya = load_lora(files["kohya"], specs)
    assert any(
        specs["unet"][n].kind == "conv" and specs["unet"][n].kernel == (3, 3) for n in kohya.layers["unet"]
    )
    assert abs(next(iter(kohya.layers["unet"].values())).scale - 3.0 / 6) < 1e-12
    peft = load_lora(files["peft"], specs)
    assert abs(next(iter(peft.layers["unet"].values())).scale - 8.0 / 4) < 1e-12
    assert set(peft.components) == {"unet", "text_encoder"}
    # text-encoder keys as transformers-4 era files spell them (text_model.encoder…) name the same layers
    layers = random_layers(specs, 4, seed=1)
    old_te = load_lora(
        write_peft(files["peft"].parent / "a4.safetensors", layers, 4, 8.0, specs, True), specs
    )
    assert old_te.layers["text_encoder"].keys() == peft.layers["text_encoder"].keys()
    for name, ly in peft.layers["text_encoder"].items():
        assert torch.equal(ly.down, old_te.layers["text_encoder"][name].down)


# rows of one batched pass: (adapters, weights) each
ROWS = [
    (["peft"], [1.0]),
    (["kohya"], [0.7]),
    ([], []),
    (["peft", "kohya"], [0.8, -0.5]),
    (["old"], [1.3]),
    (["kohya", "old"], [1.0, 0.25]),
]


def test_rows_match_diffusers(setup, bank) -> None:
    ours, theirs, _, _, base = setup
    b, pages = bank
    x, t = _inputs()
    rows = [[(pages[n], w) for n, w in zip(names, ws, strict=True)] for names, ws in ROWS]
    index, scale = b.row_tensors(rows)  # (R, 4) each
    # text encoder: every prompt under every row's adapters, one batched encoder call
    prompts = [p for _ in ROWS for p in PROMPTS]
    p_index = index.repeat_interleave(len(PROMPTS), dim=0)
    p_scale = scale.repeat_interleave(len(PROMPTS), dim=0)
    with b.rows(p_index, p_scale):
        states = ours.text_encoder.encode(prompts).view(len(ROWS), len(PROMPTS), 77, -1)
    # U-Net: row i on its own text states (first prompt), all rows in one forward pass
    b.fill(index, scale)
    with b.rows():
        eps = ours.unet(x.expand(len(ROWS), -1, -1, -1), t.expand(len(ROWS)), context=states[:, 0])
    for i, (names, ws) in enumerate(ROWS):
        ref = _theirs(theirs, names, ws) if names else base
        assert (states[i] - ref["states"]).abs().max() <= TOL, f"row {i} {names}: text states"
        assert (eps[i : i + 1] - ref["eps"]).abs().max() <= TOL, f"row {i} {names}: U-Net"
        if names:  # the adapter changes something (a parity test of a no-op would pass vacuously)
            assert (ref["eps"] - base["eps"]).abs().max() > 100 * TOL
    no_te = states[4] - base["states"]  # "old" adapts the U-Net only
    assert no_te.abs().max() == 0


def test_outside_rows_is_the_base_model(setup, bank) -> None:
    ours, _, _, _, base = setup
    x, t = _inputs()
    eps = ours.unet(x, t, context=base["states"][:1])
    assert (eps - base["eps"]).abs().max() <= TOL


def test_scale_zero_is_exactly_no_adapter(setup, bank) -> None:
    ours, _, _, _, base = setup
    b, pages = bank
    x, t = _inputs()
    index, scale = b.row_tensors([[(pages["peft"], 0.0), (pages["kohya"], 0.0)], []])
    b.fill(index, scale)
    with b.rows():
        eps = ours.unet(x.expand(2, -1, -1, -1), t.expand(2), context=base["states"][:1].expand(2, -1, -1))
    assert torch.equal(eps[0], eps[1])


def test_refusals(setup, tmp_path) -> None:
    _, _, specs, files, _ = setup
    # keys that match nothing, named
    layers = random_layers(specs, 2, seed=5, text=())
    layers["unet"]["down_blocks.7.attentions.0.proj_in"] = layers["unet"].pop(next(iter(layers["unet"])))
    with pytest.raises(LoraError, match=r"match no layer.*down_blocks.7.attentions.0.proj_in"):
        load_lora(write_diffusers_old(tmp_path / "u.safetensors", layers, specs), specs)
    # another architecture: wider layers (SDXL-like context width) / kohya metadata naming SDXL / two TEs
    wide = {
        "unet": {
            n: (torch.zeros(2, 2048), torch.zeros(s.out_features, 2))
            for n, s in specs["unet"].items()
            if n.endswith("attn2.to_k")
        }
    }
    with pytest.raises(LoraArchitectureError, match="another architecture.*2048"):
        load_lora(write_diffusers_old(tmp_path / "w.safetensors", wide, specs), specs)
    small = random_layers(specs, 2, seed=6, text=())
    meta = {"ss_base_model_version": "sdxl_base_v1-0"}
    with pytest.raises(LoraArchitectureError, match="sdxl_base_v1-0"):
        load_lora(write_kohya(tmp_path / "x.safetensors", small, 2.0, specs, meta), specs, family="sd1")
    from safetensors.torch import save_file

    save_file(
        {
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2),
        },
        str(tmp_path / "te2.safetensors"),
    )
    with pytest.raises(LoraArchitectureError, match="second text encoder"):
        load_lora(tmp_path / "te2.safetensors", specs)
    # not safetensors (a pickle), LyCORIS
    (tmp_path / "p.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(LoraError, match="not a safetensors file"):
        load_lora(tmp_path / "p.safetensors", specs)
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "h.safetensors"))
    with pytest.raises(LoraError, match="LoHa"):
        load_lora(tmp_path / "h.safetensors", specs)


def test_bank_refuses_what_does_not_fit(setup) -> None:
    ours, _, specs, files, _ = setup
    bank = LoraBank({"unet": ours.unet}, pages=4, page_rank=2, row_pages=2, convs=False, max_rows=4)
    try:
        with pytest.raises(LoraError, match="rank 6 exceeds"):
            bank.pages_for(load_lora(files["kohya"], specs))
        narrow = LoraBank({"unet": ours.unet}, pages=4, page_rank=4, row_pages=2, convs=False, max_rows=4)
        try:
            with pytest.raises(LoraError, match="not covered"):
                narrow.pages_for(load_lora(files["kohya"], specs))
        finally:
            narrow.remove()
    finally:
        bank.remove()


def test_weights_dir_untouched(setup) -> None:
    """Hooks leave the module tree and its state_dict keys as they were."""
    ours = setup[0]
    assert not any("lora" in k for k in ours.unet.state_dict())
