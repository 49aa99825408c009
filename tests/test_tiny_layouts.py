"""The tiny model set has the real on-disk layouts, so the real loading code runs against it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gie_core.testing import tiny
from gie_core.testing.tiny_configs import TINY_CONNECTOR, TINY_QWEN_TEXT, TINY_QWEN_VISION, TINY_TRANSFORMER

OLD_LAYOUT_PREFIXES = ("visual.", "model.", "lm_head.", "denoise_tower.denoise_projector.",
                       "denoise_tower.denoiser.")


def _read_checkpoint(gie_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(index JSON, every tensor of every shard) of a sharded safetensors directory."""
    index = json.loads((gie_dir / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(gie_dir.glob("model-*-of-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert key not in tensors, f"{key} is stored in more than one shard"
                tensors[key] = f.get_tensor(key)
    return index, tensors


# ----------------------------------------------------------------------------- Kontext dir


def test_kontext_pipeline_loads_and_runs_at_64px(kontext_dir):
    from diffusers import FluxKontextPipeline
    from PIL import Image

    index = json.loads((kontext_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxKontextPipeline"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                "scheduler"):
        assert (kontext_dir / sub).is_dir(), sub

    pipe = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    out = pipe(
        image=Image.new("RGB", (64, 64), (200, 30, 30)),
        prompt="add a red hat",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=2.5,
        max_area=64 * 64,
        _auto_resize=False,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert out.size == (64, 64)


# ----------------------------------------------------------------------------- GIE checkpoint


def test_gie_checkpoint_is_sharded_with_a_complete_index(gie_dir):
    index, tensors = _read_checkpoint(gie_dir)
    shards = sorted(p.name for p in gie_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    weight_map = index["weight_map"]
    assert set(weight_map) == set(tensors)  # every stored key indexed, each exactly once
    assert set(weight_map.values()) == set(shards)
    for shard in shards:
        with safe_open(str(gie_dir / shard), framework="pt") as f:
            assert {k for k, v in weight_map.items() if v == shard} == set(f.keys())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_gie_checkpoint_uses_only_old_layout_names(gie_dir):
    _, tensors = _read_checkpoint(gie_dir)
    for key in tensors:
        assert key.startswith(OLD_LAYOUT_PREFIXES), key
        assert not key.startswith(("model.language_model.", "model.visual.")), key
    assert "lm_head.weight" in tensors
    assert "model.embed_tokens.weight" in tensors
    assert "visual.patch_embed.proj.weight" in tensors

    inp, out = TINY_CONNECTOR["input_hidden_size"], TINY_CONNECTOR["output_hidden_size"]
    assert tensors["denoise_tower.denoise_projector.0.weight"].shape == (3 * out, inp)
    assert tensors["denoise_tower.denoise_projector.0.bias"].shape == (3 * out,)
    assert tensors["denoise_tower.denoise_projector.2.weight"].shape == (out, 3 * out)
    assert tensors["denoise_tower.denoise_projector.2.bias"].shape == (out,)
    tower_keys = [k for k in tensors if k.startswith("denoise_tower.")]
    assert all(k.startswith(("denoise_tower.denoise_projector.", "denoise_tower.denoiser.")) for k in tower_keys)


def test_gie_config_is_flat_qwen2_5_vl_plus_denoise_tower(gie_dir, tokenizer_dirs):
    from transformers import AutoTokenizer

    cfg = json.loads((gie_dir / "config.json").read_text())
    assert cfg["model_type"] == "univa_qwen2p5vl"
    assert cfg["architectures"] == ["UnivaQwen2p5VLForConditionalGeneration"]
    assert "text_config" not in cfg  # pre-4.52 flat style
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings"):
        assert cfg[field] == TINY_QWEN_TEXT[field], field
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert isinstance(cfg["rms_norm_eps"], float) and isinstance(cfg["rope_theta"], float)
    assert cfg["tie_word_embeddings"] is False
    assert cfg["torch_dtype"] == "float32"

    qwen = AutoTokenizer.from_pretrained(tokenizer_dirs.qwen)
    assert cfg["vocab_size"] >= len(qwen)
    assert cfg["image_token_id"] == qwen.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["video_token_id"] == qwen.convert_tokens_to_ids("<|video_pad|>")
    assert cfg["vision_start_token_id"] == qwen.convert_tokens_to_ids("<|vision_start|>")
    assert cfg["vision_end_token_id"] == qwen.convert_tokens_to_ids("<|vision_end|>")

    vision = cfg["vision_config"]
    assert vision["model_type"] == "qwen2_5_vl"
    for field, value in TINY_QWEN_VISION.items():
        assert vision[field] == (list(value) if isinstance(value, tuple) else value), field

    tower = cfg["denoise_tower"]
    assert tower["denoiser_type"] == "flux"
    assert tower["denoise_projector_type"] == "mlp2x_gelu"
    assert tower["input_hidden_size"] == TINY_CONNECTOR["input_hidden_size"] == cfg["hidden_size"]
    assert tower["output_hidden_size"] == TINY_CONNECTOR["output_hidden_size"]
    den = tower["denoiser_config"]
    assert den["_class_name"] == "FluxTransformer2DModel"
    for field, value in TINY_TRANSFORMER.items():
        assert den[field] == (list(value) if isinstance(value, tuple) else value), field
    assert den["joint_attention_dim"] == tower["output_hidden_size"]

    assert (gie_dir / "generation_config.json").is_file()


def test_gie_weights_match_stock_architectures(gie_dir, kontext_dir):
    """Renamed back, the Qwen keys load strictly into a stock Qwen2.5-VL built from config.json,
    and the denoiser keys into a FluxTransformer2DModel built from denoiser_config; the denoiser
    is a perturbed copy of the Kontext transformer."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = json.loads((gie_dir / "config.json").read_text())
    _, tensors = _read_checkpoint(gie_dir)

    text_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                   "max_position_embeddings", "rope_scaling", "tie_word_embeddings")
    vision = {k: v for k, v in cfg["vision_config"].items() if k != "model_type"}
    qcfg = Qwen2_5_VLConfig(text_config={k: cfg[k] for k in text_fields}, vision_config=vision,
                            image_token_id=cfg["image_token_id"], tie_word_embeddings=False)
    qwen = Qwen2_5_VLForConditionalGeneration(qcfg)
    new_names = {}
    for key in tensors:
        if key.startswith("visual."):
            new_names[key] = "model.visual." + key[len("visual."):]
        elif key.startswith("model."):
            new_names[key] = "model.language_model." + key[len("model."):]
        elif key == "lm_head.weight":
            new_names[key] = key
    qwen.load_state_dict({new: tensors[old] for old, new in new_names.items()}, strict=True)

    den_cfg = {k: v for k, v in cfg["denoise_tower"]["denoiser_config"].items() if not k.startswith("_")}
    denoiser = FluxTransformer2DModel(**den_cfg)
    prefix = "denoise_tower.denoiser."
    den_state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    denoiser.load_state_dict(den_state, strict=True)

    stock = load_file(str(kontext_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(stock) == set(den_state)
    for k, v in stock.items():
        diff = (den_state[k] - v).abs().max().item()
        assert 0 < diff < 0.1, (k, diff)


def test_gie_checkpoint_without_kontext_dir(tmp_path):
    d = tiny.build_gie_checkpoint(tmp_path / "gie", kontext_dir=None, seed=3)
    index, tensors = _read_checkpoint(d)
    assert set(index["weight_map"]) == set(tensors)
    assert any(k.startswith("denoise_tower.denoiser.transformer_blocks.0.") for k in tensors)


# ----------------------------------------------------------------------------- tokenizers


def test_qwen_chat_template_renders_the_reference_prompt(gie_dir, tokenizer_dirs):
    from transformers import AutoTokenizer

    text = "make the background a city street"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
    )
    for d in (tokenizer_dirs.qwen, gie_dir):
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
        assert json.loads((d / "chat_template.json").read_text())["chat_template"] == tok.chat_template


def test_qwen_tokenizer_special_tokens(tokenizer_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dirs.qwen)
    ids = tok.convert_tokens_to_ids(list(tiny.QWEN_SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # contiguous, in the real order
    assert ids[-1] == len(tok) - 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left"
    # special tokens are never split, and a pad at the left of a batch
    batch = tok(["add a red hat", "remove the person on the left"], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id
    assert tok("<|vision_start|><|image_pad|><|vision_end|>")["input_ids"] == [
        tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    ]


def test_qwen_image_processor_loads_and_gives_the_448px_grid(gie_dir, tokenizer_dirs):
    from PIL import Image

    try:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor  # transformers 5
    except ImportError:  # transformers 4.x
        from transformers import Qwen2VLImageProcessor as ImageProcessor

    for d in (tokenizer_dirs.qwen, gie_dir):
        cfg = json.loads((d / "preprocessor_config.json").read_text())
        assert cfg["image_processor_type"] == "Qwen2VLImageProcessor"
        proc = ImageProcessor.from_pretrained(d)
        out = proc(images=[Image.new("RGB", (448, 448), (10, 120, 240))], return_tensors="pt")
        assert out["image_grid_thw"].tolist() == [[1, 32, 32]]
        assert out["pixel_values"].shape == (32 * 32, 3 * 2 * 14 * 14)


def test_clip_eos_is_the_highest_id(tokenizer_dirs, kontext_dir):
    from transformers import AutoTokenizer, CLIPTextConfig

    for d in (tokenizer_dirs.clip, kontext_dir / "tokenizer"):
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.eos_token == tok.pad_token == "<|endoftext|>"
        assert tok.bos_token == "<|startoftext|>"
        assert tok.eos_token_id == len(tok) - 1 == max(tok.get_vocab().values())
        assert tok.model_max_length == 77
        ids = tok("Add a red hat!")["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        # legacy argmax pooling and eos pooling pick the same position
        assert ids.index(tok.eos_token_id) == max(range(len(ids)), key=ids.__getitem__)
    text_cfg = CLIPTextConfig.from_pretrained(kontext_dir / "text_encoder")
    assert text_cfg.eos_token_id == tok.eos_token_id and text_cfg.vocab_size == len(tok)


def test_t5_tokenizer_ids(tokenizer_dirs, kontext_dir):
    from transformers import AutoTokenizer, T5Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dirs.t5)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (tokenizer_dirs.t5 / "tokenizer.json").is_file()
    ids = tok("make the background a city street")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert T5Config.from_pretrained(kontext_dir / "text_encoder_2").vocab_size >= len(tok)


def test_tokenizers_are_deterministic(tmp_path, tokenizer_dirs):
    """The tokenizer files do not depend on the run (tie-breaking in BPE training included)."""
    paths = tiny.build_tokenizers(tmp_path / "again")
    for name in ("clip", "t5", "qwen"):
        a, b = getattr(tokenizer_dirs, name), getattr(paths, name)
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir())
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"{name}/{f}"


# ----------------------------------------------------------------------------- the cached set


def test_build_tiny_model_set_is_idempotent_and_reuses_the_cache(tiny_set):
    marker = tiny_set.root / tiny.MARKER_NAME
    assert marker.is_file()
    before = {p: p.stat().st_mtime_ns for p in tiny_set.root.rglob("*") if p.is_file()}
    start = time.perf_counter()
    again = tiny.build_tiny_model_set(tiny_set.root)
    assert time.perf_counter() - start < 0.5
    assert again == tiny_set
    after = {p: p.stat().st_mtime_ns for p in tiny_set.root.rglob("*") if p.is_file()}
    assert after == before
    # no temporary build directories left beside the set
    assert [p.name for p in tiny_set.root.parent.iterdir()] == [tiny_set.root.name]


def test_build_tiny_model_set_rebuilds_a_stale_set_and_refuses_foreign_dirs(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    (root / tiny.MARKER_NAME).write_text("some older version\n")
    (root / "leftover.txt").write_text("x")
    built = tiny.build_tiny_model_set(root)
    assert not (root / "leftover.txt").exists()
    assert (built.gie_dir / "config.json").is_file()
    assert (root / tiny.MARKER_NAME).read_text().strip() != "some older version"

    foreign = tmp_path / "not-a-set"
    foreign.mkdir()
    (foreign / "my-file.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tiny model set"):
        tiny.build_tiny_model_set(foreign)
    assert (foreign / "my-file.txt").read_text() == "keep me"


def test_default_tiny_root(monkeypatch, tmp_path):
    monkeypatch.setenv("GIE_CACHE_DIR", str(tmp_path / "gie-cache"))
    assert tiny.default_tiny_root() == tmp_path / "gie-cache" / "tiny-v1"
    monkeypatch.delenv("GIE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tiny.default_tiny_root() == tmp_path / "xdg" / "gpt-image-edit" / "tiny-v1"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tiny.default_tiny_root() == Path.home() / ".cache" / "gpt-image-edit" / "tiny-v1"
