"""Single-file loading: the transformer, VAE and text-encoder files ComfyUI users keep load
into the diffusers/transformers models with every weight and every output unchanged."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import bfl_layout  # noqa: E402
from gie_core.weights import single_file  # noqa: E402
from gie_core.weights.single_file import (  # noqa: E402
    bfl_flux_key_to_diffusers,
    detect_single_file_kind,
    ldm_vae_key_to_diffusers,
    load_bfl_transformer,
    load_bfl_vae,
    load_clip_text,
    load_config,
    load_t5_encoder,
)
from gie_core.testing.tiny_configs import TINY_CLIP_TEXT, TINY_T5, TINY_TRANSFORMER, TINY_VAE  # noqa: E402
from gie_core.weights.reader import CheckpointError  # noqa: E402

torch.set_num_threads(1)

T5_VOCAB = 100
CLIP_VOCAB = 300
CLIP_EOS = 299


def _jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every parameter (default inits leave zeros and ones that would hide a
    swapped or misplaced tensor)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _assert_same_params(loaded: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = dict(loaded.state_dict())
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], value.float()), name


def _fp8_rounded(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float8_e4m3fn).float() if v.is_floating_point() else v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return _jitter(FluxTransformer2DModel.from_config(TINY_TRANSFORMER), seed=1)


def _flux_inputs():
    gen = torch.Generator().manual_seed(7)
    img_len, txt_len = 16, 5
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(
        hidden_states=torch.randn(1, img_len, 64, generator=gen),
        encoder_hidden_states=torch.randn(1, txt_len, TINY_TRANSFORMER["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(1, TINY_TRANSFORMER["pooled_projection_dim"], generator=gen),
        timestep=torch.tensor([0.7]),
        guidance=torch.tensor([3.5]),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(txt_len, 3),
        return_dict=False,
    )


def _flux_out(model):
    with torch.no_grad():
        return model(**_flux_inputs())[0]


def _with_params(model, sd):
    """A copy of ``model`` holding ``sd``."""
    import copy

    other = copy.deepcopy(model)
    other.load_state_dict(sd)
    return other


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfy_prefixed"])
def test_bfl_transformer_loads_back_equal(tmp_path, tiny_flux, prefix):
    bfl = bfl_layout.flux_diffusers_to_bfl(tiny_flux.state_dict())
    path = bfl_layout.save(bfl_layout.add_prefix(bfl, prefix), tmp_path / "flux1-kontext-dev.safetensors")

    assert detect_single_file_kind(path) == "bfl_transformer"
    loaded = load_bfl_transformer(path, dtype=torch.float32)

    for field in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                  "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "in_channels"):
        assert loaded.config[field] == TINY_TRANSFORMER[field], field
    assert tuple(loaded.config.axes_dims_rope) == TINY_TRANSFORMER["axes_dims_rope"]
    _assert_same_params(loaded, tiny_flux.state_dict())
    assert (_flux_out(loaded) - _flux_out(tiny_flux)).abs().max() <= 1e-5


def test_bfl_transformer_fp8_is_upcast(tmp_path, tiny_flux):
    bfl = bfl_layout.flux_diffusers_to_bfl(tiny_flux.state_dict())
    path = bfl_layout.save(bfl_layout.to_fp8(bfl), tmp_path / "flux1-kontext-dev-fp8_e4m3fn.safetensors")

    loaded = load_bfl_transformer(path, dtype=torch.float32)

    rounded = _fp8_rounded(tiny_flux.state_dict())
    _assert_same_params(loaded, rounded)
    assert (_flux_out(loaded) - _flux_out(_with_params(tiny_flux, rounded))).abs().max() <= 1e-5


@pytest.mark.parametrize("style", ["scale_weight", "weight_scale"])
def test_comfy_scaled_fp8_transformer_applies_scales(tmp_path, tiny_flux, style):
    bfl = bfl_layout.flux_diffusers_to_bfl(tiny_flux.state_dict())
    scaled, metadata, dequantised = bfl_layout.to_scaled_fp8(bfl_layout.add_prefix(bfl, "model.diffusion_model."), style=style)
    path = bfl_layout.save(scaled, tmp_path / "flux1-kontext-dev-fp8-scaled.safetensors", metadata)
    # the same values stored plainly in fp32
    reference = bfl_layout.save(dequantised, tmp_path / "reference.safetensors")

    loaded = load_bfl_transformer(path, dtype=torch.float32)
    expected = load_bfl_transformer(reference, dtype=torch.float32)

    _assert_same_params(loaded, expected.state_dict())
    # the scales matter: without them the weights would be off by orders of magnitude
    assert (_flux_out(loaded) - _flux_out(tiny_flux)).abs().max() < 0.1 * _flux_out(tiny_flux).abs().max()


def test_unsupported_quantisation_is_refused(tmp_path, tiny_flux):
    bfl = bfl_layout.flux_diffusers_to_bfl(tiny_flux.state_dict())
    conf = json.dumps({"format": "nvfp4"}).encode()
    bfl["double_blocks.0.img_attn.qkv.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    path = bfl_layout.save(bfl, tmp_path / "flux-nvfp4.safetensors")
    with pytest.raises(CheckpointError, match="nvfp4"):
        load_bfl_transformer(path, dtype=torch.float32)


def test_diffusers_layout_transformer_file_loads(tmp_path, tiny_flux):
    path = bfl_layout.save(tiny_flux.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    assert detect_single_file_kind(path) == "diffusers_transformer"
    loaded = load_bfl_transformer(path, dtype=torch.float32)
    _assert_same_params(loaded, tiny_flux.state_dict())
    assert (_flux_out(loaded) - _flux_out(tiny_flux)).abs().max() <= 1e-5


def test_bf16_default_dtype(tmp_path, tiny_flux):
    bfl = bfl_layout.flux_diffusers_to_bfl(tiny_flux.state_dict())
    path = bfl_layout.save({k: v.to(torch.bfloat16) for k, v in bfl.items()}, tmp_path / "flux-bf16.safetensors")
    loaded = load_bfl_transformer(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_key_mapping_matches_diffusers_converter_at_real_width():
    """Our per-tensor mapping gives exactly the keys and shapes of diffusers' own (whole-dict,
    hard-coded 3072-wide) converter, at the real Kontext width."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    meta_model = bfl_layout.real_width_flux_meta()
    model_sd = meta_model.state_dict()
    bfl = bfl_layout.flux_diffusers_to_bfl(model_sd)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and bfl["single_blocks.0.linear1.weight"].shape == (21504, 3072)

    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = {}
    for key, tensor in bfl.items():
        for name, part in bfl_flux_key_to_diffusers(key, tensor, inner_dim=3072, mlp_hidden_dim=12288):
            assert name not in ours, f"{name} produced twice"
            ours[name] = part

    assert set(ours) == set(theirs) == set(model_sd)
    for name in ours:
        assert ours[name].shape == theirs[name].shape == model_sd[name].shape, name


def test_key_mapping_rejects_unknown_and_misfit_tensors():
    with pytest.raises(CheckpointError, match="not a tensor of a BFL FLUX"):
        bfl_flux_key_to_diffusers("double_blocks.0.img_attn.rope.weight", torch.zeros(2), inner_dim=64, mlp_hidden_dim=256)
    with pytest.raises(CheckpointError, match="rows"):
        bfl_flux_key_to_diffusers("single_blocks.0.linear1.weight", torch.zeros(100, 64), inner_dim=64, mlp_hidden_dim=256)


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return _jitter(AutoencoderKL.from_config(TINY_VAE), seed=2)


def _vae_roundtrip(vae):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(image).latent_dist.mean
        return latent, vae.decode(latent).sample


@pytest.mark.parametrize("layout", ["ldm", "ldm_linear_attention", "diffusers"])
def test_vae_loads_back_equal(tmp_path, tiny_vae, layout):
    sd = tiny_vae.state_dict()
    if layout == "ldm":
        sd = bfl_layout.vae_diffusers_to_ldm(sd)
        # LDM numbers decoder blocks by resolution level like the encoder (diffusers in run order):
        # up.0 is the full-resolution block, the one without an upsampler
        assert sd["encoder.mid.attn_1.q.weight"].ndim == 4 and "decoder.up.0.upsample.conv.weight" not in sd
        assert "decoder.up.3.upsample.conv.weight" in sd
    elif layout == "ldm_linear_attention":
        sd = bfl_layout.vae_diffusers_to_ldm(sd, conv_attention=False)
    path = bfl_layout.save(sd, tmp_path / "ae.safetensors")

    assert detect_single_file_kind(path) == "vae"
    loaded = load_bfl_vae(path, dtype=torch.float32)

    assert list(loaded.config.block_out_channels) == list(TINY_VAE["block_out_channels"])
    assert loaded.config.layers_per_block == TINY_VAE["layers_per_block"]
    assert loaded.config.scaling_factor == 0.3611 and loaded.config.shift_factor == 0.1159
    _assert_same_params(loaded, tiny_vae.state_dict())
    for got, want in zip(_vae_roundtrip(loaded), _vae_roundtrip(tiny_vae)):
        assert (got - want).abs().max() <= 1e-5


def test_vae_key_mapping_matches_diffusers_converter_at_real_size():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = single_file.model_kwargs(load_config("flux-ae"))
    with torch.device("meta"):
        model_sd = AutoencoderKL.from_config(config).state_dict()
    ldm = bfl_layout.vae_diffusers_to_ldm(model_sd)

    theirs = convert_ldm_vae_checkpoint(dict(ldm), config)
    ours = {}
    for key, tensor in ldm.items():
        name = ldm_vae_key_to_diffusers(key, num_up_blocks=4)
        ours[name] = single_file._vae_attention_to_linear(name, tensor)

    assert set(ours) == set(theirs) == set(model_sd)
    for name in ours:
        assert ours[name].shape == theirs[name].shape == model_sd[name].shape, name


# --------------------------------------------------------------------------------------------
# T5
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return _jitter(T5EncoderModel(T5Config(vocab_size=T5_VOCAB, **TINY_T5)), seed=3)


T5_IDS = torch.tensor([[5, 17, 42, 99, 3, 1], [8, 8, 61, 1, 0, 0]])
T5_MASK = (torch.arange(6) < torch.tensor([[6], [4]])).long()


def _t5_out(model):
    with torch.no_grad():
        return model(input_ids=T5_IDS, attention_mask=T5_MASK).last_hidden_state


def _t5_file_sd(model, embeddings: str) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if embeddings == "both":
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    elif embeddings == "encoder_only":
        sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
    return sd


@pytest.mark.parametrize("embeddings", ["shared", "both", "encoder_only"])
def test_t5_loads_back_equal(tmp_path, tiny_t5, embeddings):
    sd = _t5_file_sd(tiny_t5, embeddings)
    sd["decoder.final_layer_norm.weight"] = torch.ones(TINY_T5["d_model"])  # a full T5's decoder is dropped
    path = bfl_layout.save(sd, tmp_path / "t5xxl_fp16.safetensors")

    assert detect_single_file_kind(path) == "t5"
    loaded = load_t5_encoder(path, dtype=torch.float32)

    cfg = loaded.config
    assert (cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.vocab_size) == (
        TINY_T5["d_model"], TINY_T5["d_kv"], TINY_T5["d_ff"], TINY_T5["num_layers"], TINY_T5["num_heads"], T5_VOCAB)
    assert cfg.relative_attention_num_buckets == TINY_T5["relative_attention_num_buckets"]
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight
    _assert_same_params(loaded, tiny_t5.state_dict())
    assert (_t5_out(loaded) - _t5_out(tiny_t5)).abs().max() <= 1e-5


def test_t5_fp8_is_upcast(tmp_path, tiny_t5):
    path = bfl_layout.save(bfl_layout.to_fp8(_t5_file_sd(tiny_t5, "shared")), tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    loaded = load_t5_encoder(path, dtype=torch.float32)
    rounded = _fp8_rounded(tiny_t5.state_dict())
    _assert_same_params(loaded, rounded)
    assert (_t5_out(loaded) - _t5_out(_with_params(tiny_t5, rounded))).abs().max() <= 1e-5


def test_t5_scaled_fp8_and_fp16_keep_wo_in_fp32(tmp_path, tiny_t5):
    scaled, metadata, dequantised = bfl_layout.to_scaled_fp8(_t5_file_sd(tiny_t5, "shared"))
    path = bfl_layout.save(scaled, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", metadata)
    loaded = load_t5_encoder(path, dtype=torch.float16)
    wo = loaded.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32
    assert torch.equal(wo, dequantised["encoder.block.0.layer.1.DenseReluDense.wo.weight"])
    assert loaded.shared.weight.dtype == torch.float16


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=CLIP_VOCAB, bos_token_id=CLIP_VOCAB - 2, eos_token_id=CLIP_EOS, pad_token_id=1,
                            **TINY_CLIP_TEXT)
    return _jitter(CLIPTextModel(config), seed=4)


CLIP_IDS = torch.tensor([[CLIP_VOCAB - 2, 10, 20, 30, CLIP_EOS, CLIP_EOS, CLIP_EOS], [CLIP_VOCAB - 2, 7, CLIP_EOS, 1, 1, 1, 1]])


def _clip_out(model):
    with torch.no_grad():
        out = model(input_ids=CLIP_IDS)
    return out.last_hidden_state, out.pooler_output


def _comfy_clip_sd(model) -> dict[str, torch.Tensor]:
    """clip_l.safetensors as ComfyUI keeps it: ``text_model.*`` plus a text projection."""
    sd = {}
    for k, v in model.state_dict().items():
        sd[k if k.startswith("text_model.") else "text_model." + k] = v
    sd["text_projection.weight"] = torch.randn(64, TINY_CLIP_TEXT["hidden_size"])
    sd["logit_scale"] = torch.tensor(4.6)
    return sd


@pytest.mark.parametrize("prefix", ["", "cond_stage_model.transformer."])
def test_clip_loads_back_equal(tmp_path, tiny_clip, prefix):
    path = bfl_layout.save(bfl_layout.add_prefix(_comfy_clip_sd(tiny_clip), prefix), tmp_path / "clip_l.safetensors")

    assert detect_single_file_kind(path) == "clip"
    loaded = load_clip_text(path, dtype=torch.float32, eos_token_id=CLIP_EOS)

    cfg = loaded.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        64, TINY_CLIP_TEXT["num_hidden_layers"], 1, TINY_CLIP_TEXT["intermediate_size"])
    assert cfg.eos_token_id == CLIP_EOS and cfg.hidden_act == "quick_gelu"
    _assert_same_params(loaded, tiny_clip.state_dict())
    for got, want in zip(_clip_out(loaded), _clip_out(tiny_clip)):
        assert (got - want).abs().max() <= 1e-5


def test_clip_eos_defaults_to_the_real_tokenizer_id(tmp_path, tiny_clip):
    path = bfl_layout.save(_comfy_clip_sd(tiny_clip), tmp_path / "clip_l.safetensors")
    assert load_clip_text(path, dtype=torch.float32).config.eos_token_id == 49407


# --------------------------------------------------------------------------------------------
# Configs and errors
# --------------------------------------------------------------------------------------------


def test_shipped_configs_are_the_real_architectures():
    from diffusers import FlowMatchEulerDiscreteScheduler

    flux = load_config("flux1-kontext-dev-transformer")
    assert (flux["num_layers"], flux["num_single_layers"], flux["attention_head_dim"], flux["num_attention_heads"]) == (19, 38, 128, 24)
    assert flux["axes_dims_rope"] == [16, 56, 56] and flux["joint_attention_dim"] == 4096
    ae = load_config("flux-ae.json")
    assert ae["block_out_channels"] == [128, 256, 512, 512] and ae["latent_channels"] == 16
    t5 = load_config("t5-v1_1-xxl-encoder")
    assert (t5["d_model"], t5["d_ff"], t5["num_heads"], t5["num_layers"]) == (4096, 10240, 64, 24)
    clip = load_config("clip-vit-large-patch14-text")
    assert (clip["hidden_size"], clip["eos_token_id"], clip["hidden_act"]) == (768, 49407, "quick_gelu")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(single_file.model_kwargs(load_config("flow-match-scheduler")))
    assert scheduler.config.use_dynamic_shifting and scheduler.config.max_shift == 1.15
    load_config("flux-ae")["latent_channels"] = 0  # each call is a fresh copy
    assert load_config("flux-ae")["latent_channels"] == 16
    with pytest.raises(ValueError, match="not shipped"):
        load_config("sdxl-vae")


def test_wrong_kind_is_named(tmp_path, tiny_t5, tiny_vae):
    t5 = bfl_layout.save(_t5_file_sd(tiny_t5, "shared"), tmp_path / "t5xxl_fp16.safetensors")
    with pytest.raises(CheckpointError, match=r"t5xxl_fp16\.safetensors looks like a T5 text encoder, not a FLUX transformer"):
        load_bfl_transformer(t5)
    vae = bfl_layout.save(tiny_vae.state_dict(), tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="looks like a VAE, not a CLIP text encoder"):
        load_clip_text(vae)
    with pytest.raises(CheckpointError, match="looks like a T5 text encoder, not a VAE"):
        load_bfl_vae(t5)
    other = bfl_layout.save({"foo.weight": torch.zeros(2)}, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="lora.safetensors is not a FLUX transformer, VAE, T5, CLIP or Qwen2.5-VL text encoder or a connector"):
        detect_single_file_kind(other)


@pytest.mark.parametrize("loader", [load_bfl_transformer, load_bfl_vae, load_t5_encoder, load_clip_text, detect_single_file_kind])
def test_missing_and_corrupt_files_are_named(tmp_path, tiny_t5, loader):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        loader(missing)

    good = bfl_layout.save(_t5_file_sd(tiny_t5, "shared"), tmp_path / "full.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        loader(truncated)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        loader(garbage)
