"""gie-convert: the released checkpoint as the single files ComfyUI users keep.

Every tensor survives the round trip (fp32), fp8 variants stay within fp8 rounding, an edit from
the split files equals the edit from the folder bit for bit, the BFL layout is what diffusers'
own converter reads at real width, and bad input or an interrupted conversion leaves nothing.
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gie_core.weights import convert as conv
from gie_core.cli.convert import main
from gie_core.weights.convert import bfl_transformer_plan, compare_qwen, convert
from gie_core.weights.loading import load_connector, load_gie_checkpoint, load_kontext_dir
from gie_core.engine.pipeline import EditPipeline
from gie_core.weights.single_file import load_bfl_transformer, load_qwen_file
from gie_core.weights.reader import CheckpointError, CheckpointReader


@pytest.fixture(scope="module")
def folder(gie_dir):
    return load_gie_checkpoint(gie_dir, dtype="fp32")


@pytest.fixture(scope="module")
def split_fp32(gie_dir, tmp_path_factory):
    return convert(gie_dir, tmp_path_factory.mktemp("models"), transformer_format="fp32", qwen_format="fp32",
                   lm_head=True)


def _equal_state(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa = {k: v for k, v in a.state_dict().items() if not k.startswith(skip)}
    sb = {k: v for k, v in b.state_dict().items() if not k.startswith(skip)}
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_three_files_in_comfyui_folders_with_their_metadata(split_fp32, gie_dir):
    assert {p: path.parent.name for p, path in split_fp32.items()} == {
        "transformer": "diffusion_models", "qwen": "text_encoders", "connector": "gie_connectors"}
    for part, path in split_fp32.items():
        with CheckpointReader.open(path) as r:
            meta = r.metadata
            keys = set(r.keys())
        assert meta["gie_source"] == str(gie_dir.resolve()) and meta["gie_source_kind"] == "released"
        assert meta["gie_generator"].startswith("gpt-image-edit gie-convert")
        if part == "transformer":
            assert meta["gie_component"] == "kontext_transformer" and meta["gie_layout"] == "bfl"
            assert {"img_in.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                    "final_layer.adaLN_modulation.1.weight"} <= keys  # what ComfyUI's FLUX detection reads
            assert "double_blocks.0.img_attn.norm.key_norm.scale" in keys
        elif part == "qwen":
            assert meta["gie_component"] == "qwen2.5-vl" and json.loads(meta["gie_qwen_config"])["model_type"]
            assert "lm_head.weight" in keys and all(k.startswith(("model.", "visual.", "lm_head.")) for k in keys)
        else:
            cfg = json.loads(meta["gie_connector_config"])
            assert meta["gie_fusion_mode"] == "vlm+t5" and "vlm+t5" in cfg["modes"]


def test_every_tensor_maps_back_to_the_folders(split_fp32, folder, gie_dir):
    _equal_state(folder.transformer, load_bfl_transformer(split_fp32["transformer"], dtype=torch.float32))
    qwen = load_qwen_file(split_fp32["qwen"], tokenizer_dir=gie_dir, dtype=torch.float32)
    # the folder's LM head is read on first use (generation); compare it with the checkpoint's tensor
    _equal_state(folder.encoder.model, qwen.model, skip=("lm_head.",))
    with CheckpointReader.open(gie_dir) as r:
        assert torch.equal(qwen.model.lm_head.weight, r.read("lm_head.weight").float())
    _equal_state(folder.connector, load_connector(split_fp32["connector"], dtype=torch.float32))
    assert compare_qwen(gie_dir, split_fp32["qwen"], lm_head=True).equal


def test_an_edit_from_the_split_files_equals_the_folders(split_fp32, gie_dir, kontext_dir):
    comps = load_kontext_dir(kontext_dir, dtype="fp32", parts=("vae", "scheduler", "clip", "t5"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    folder = EditPipeline.from_paths(gie_dir=gie_dir, kontext_dir=kontext_dir, dtype="fp32", device="cpu")
    split = EditPipeline(
        transformer=load_bfl_transformer(split_fp32["transformer"], dtype=torch.float32), vae=comps.vae,
        scheduler=comps.scheduler, text=comps.text,
        qwen=load_qwen_file(split_fp32["qwen"], tokenizer_dir=gie_dir, dtype=torch.float32, lm_head=False),
        connector=load_connector(split_fp32["connector"], dtype=torch.float32), device="cpu",
    )
    kw = dict(steps=2, size=(64, 48), reference_resize="keep", seed=3)
    # every weight is equal (test above); the folder's are the file's mapped pages (8-byte aligned), the
    # single files' are copies (64-byte aligned), and the CPU's matrix kernels round the last bit by alignment
    torch.testing.assert_close(folder.edit(image, "add a hat", **kw).tensor, split.edit(image, "add a hat", **kw).tensor,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_scaled", "bf16"])
def test_smaller_formats_load_within_their_rounding(fmt, gie_dir, folder, tmp_path):
    out = convert(gie_dir, tmp_path, parts=("transformer", "qwen"), transformer_format=fmt, qwen_format=fmt)
    assert out["transformer"].stat().st_size < 0.6 * os.path.getsize(
        convert(gie_dir, tmp_path / "f32", parts=("transformer",), transformer_format="fp32")["transformer"])
    loaded = load_bfl_transformer(out["transformer"], dtype=torch.float32).state_dict()
    with CheckpointReader.open(out["transformer"]) as r:
        assert ("scaled_fp8" in r) == (fmt == "fp8_scaled")
    for k, ref in folder.transformer.state_dict().items():
        # e4m3 keeps 3 mantissa bits (relative 1/16); tiny magnitudes fall to its subnormal step
        step = 2.0**-9 * (ref.abs().max().item() / 448 if fmt == "fp8_scaled" else 1.0)
        bound = ref.abs() / (16 if fmt.startswith("fp8") else 128) + (step if fmt.startswith("fp8") else 0)
        assert ((loaded[k] - ref).abs() <= bound + 1e-12).all(), k
    assert compare_qwen(gie_dir, out["qwen"]).equal  # compared at the file's own precision
    qwen = load_qwen_file(out["qwen"], tokenizer_dir=gie_dir, dtype=torch.float32)
    feats = qwen.encode(Image.new("RGB", (32, 32), (20, 40, 60)), "add a hat").hidden
    ref = folder.encoder.encode(Image.new("RGB", (32, 32), (20, 40, 60)), "add a hat").hidden
    assert torch.isfinite(feats).all() and feats.shape == ref.shape


def test_bfl_layout_is_what_diffusers_own_converter_reads_at_real_width():
    """At the real Kontext width (meta tensors): our BFL keys and shapes, fed to diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers``, give back the model's own."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from gie_core.weights.single_file import TRANSFORMER_CONFIG, load_config, model_kwargs

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(model_kwargs(load_config(TRANSFORMER_CONFIG)))
    state = model.state_dict()
    bfl = {}
    for item in bfl_transformer_plan(state):
        shapes = [state[s].shape for s in item.sources]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if item.op == "cat" else shapes[0]
        bfl[item.key] = torch.empty(shape, device="meta")
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert "double_blocks.18.img_attn.qkv.weight" in bfl and bfl["single_blocks.37.linear1.weight"].shape[0] == 3 * 3072 + 12288


def test_bad_sources_and_outputs_are_refused_before_reading(tmp_path, kontext_dir, gie_dir, split_fp32):
    with pytest.raises(CheckpointError, match="not a GPT-Image-Edit checkpoint"):
        convert(kontext_dir, tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path)
    with pytest.raises(CheckpointError, match="is a file"):
        convert(split_fp32["connector"], tmp_path)
    with pytest.raises(ValueError, match="transformer format 'int4' is unknown"):
        convert(gie_dir, tmp_path, transformer_format="int4")
    with pytest.raises(CheckpointError, match="not a Qwen2.5-VL text-encoder file"):
        compare_qwen(gie_dir, split_fp32["transformer"])
    out = tmp_path / "out"
    convert(gie_dir, out, parts=("connector",))
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        convert(gie_dir, out, parts=("connector",))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "connector.safetensors").write_bytes(split_fp32["connector"].read_bytes())
    with pytest.raises(CheckpointError, match="has no qwen to convert"):
        convert(tmp_path / "export", out, parts=("qwen",))


def test_an_interrupted_conversion_leaves_no_partial_file(gie_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = conv.read_upcast

    def dies(reader, key):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(reader, key)

    monkeypatch.setattr(conv, "read_upcast", dies)
    with pytest.raises(KeyboardInterrupt):
        convert(gie_dir, tmp_path, parts=("transformer",))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_ctrl_c_after_some_files_names_what_was_written(gie_dir, tmp_path, monkeypatch, capsys):
    """gie-convert interrupted while writing its second file says which file is complete and that
    the one being written was not left (it used to say "no output written")."""
    real = conv.read_upcast

    def dies(reader, key):
        if "double_blocks" in key or "transformer_blocks" in key:
            raise KeyboardInterrupt
        return real(reader, key)

    monkeypatch.setattr(conv, "read_upcast", dies)
    out = tmp_path / "models"
    assert main([str(gie_dir), "--out", str(out), "--parts", "connector,transformer"]) == 130
    err = capsys.readouterr().err
    (connector,) = [p for p in out.rglob("*") if p.is_file()]
    assert "no output written" not in err
    assert f"after writing {connector}" in err and "kontext" in err and "was not written" in err


def test_a_disk_too_small_or_full_is_reported_with_real_sizes_and_the_path(gie_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(conv, "free_space", lambda path: 300_000)  # the tiny transformer needs ~1.1 MB
    assert main([str(gie_dir), "--out", str(tmp_path / "models"), "--parts", "transformer"]) == 2
    err = capsys.readouterr().err
    assert "needs 1." in err and " MB but only 300 kB is free on that disk" in err and "0.00 GB" not in err
    assert "diffusion_models" in err and str(tmp_path) in err
    monkeypatch.undo()
    real_open = open

    def full_disk(path, mode="r", *a, **k):  # the disk fills up while the file is written
        if "w" in mode and str(path).endswith(".partial"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_disk)
    assert main([str(gie_dir), "--out", str(tmp_path / "models"), "--parts", "connector"]) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "gie_connectors" in err and "free there" in err and "Traceback" not in err
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_the_command(gie_dir, tmp_path, capsys, split_fp32):
    assert main([str(gie_dir), "--out", str(tmp_path), "--parts", "transformer,connector",
                 "--transformer-format", "fp8_scaled", "--name", "mine"]) == 0
    out = capsys.readouterr().out
    assert "diffusion_models/mine-kontext-fp8_scaled.safetensors" in out and "gie_connectors/mine-connector" in out
    assert main([str(gie_dir), "--compare-qwen", str(split_fp32["qwen"])]) == 0
    assert "equal: all" in capsys.readouterr().out
    # a stock file whose values differ: exit 3 and the first differing tensor named
    with CheckpointReader.open(split_fp32["qwen"]) as r:
        state = {k: r.read(k) for k in r.keys()}
    state["model.norm.weight"] = state["model.norm.weight"] + 1
    from safetensors.torch import save_file

    save_file(state, tmp_path / "other.safetensors")
    assert main([str(gie_dir), "--compare-qwen", str(tmp_path / "other.safetensors")]) == 3
    assert "1 tensors differ (e.g. model.norm.weight" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(gie_dir)]) == 2


def test_gguf_q8_0_transformer_loads_and_samples_close_to_the_folder(gie_dir, folder, tmp_path):
    pytest.importorskip("gguf", reason="the gguf package writes and reads GGUF files")
    from gie_core.weights.gguf import gguf_metadata, load_gguf_transformer

    out = convert(gie_dir, tmp_path, parts=("transformer",), transformer_format="gguf_q8_0")
    assert out["transformer"].name.endswith("-kontext-gguf_q8_0.gguf")
    assert gguf_metadata(out["transformer"]).get("gie_component") == "kontext_transformer"
    model = load_gguf_transformer(out["transformer"], dtype=torch.float32)
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0))
    cfg = folder.transformer.config
    kw = dict(hidden_states=x, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
              pooled_projections=torch.ones(1, cfg.pooled_projection_dim), encoder_hidden_states=torch.ones(1, 4, cfg.joint_attention_dim),
              txt_ids=torch.zeros(4, 3), img_ids=torch.zeros(12, 3), return_dict=False)
    with torch.no_grad():
        ref, q8 = folder.transformer(**kw)[0], model(**kw)[0]
    assert ((q8 - ref).abs().max() / ref.abs().max()).item() < 0.05  # 8-bit blocks: a few per cent at most
