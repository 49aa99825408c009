"""``gie-edit`` as a user runs it: the demo, real layouts from directories and single files, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import bfl_layout
from gie_core.cli.edit import main

COMMON = ["--steps", "2", "--size", "64x48", "--reference-size", "keep", "--dtype", "fp32", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "photo.png"
    rng = np.random.RandomState(1)
    Image.fromarray((rng.rand(60, 90, 3) * 255).astype(np.uint8)).save(path)
    return path


def test_demo_runs_on_the_bundled_sample_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GIE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "demo.png"
    assert main(["-o", str(out), "--steps", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "DEMO" in err and "RANDOM" in err
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size == (288, 224)  # ~256x256 area at the sample's 4:3
    assert (tmp_path / "cache" / "tiny-v1" / ".complete").exists()


def test_released_model_edit_and_snap_back_to_input_size(tmp_path, photo, gie_dir, kontext_dir):
    out = tmp_path / "edit.png"
    args = [str(photo), "add a red hat", "-o", str(out), "--model", str(gie_dir), "--kontext", str(kontext_dir), *COMMON]
    assert main(args) == 0
    assert Image.open(out).size == (64, 48)
    snapped = tmp_path / "snapped.png"
    assert main([*args[:2], "-o", str(snapped), *args[4:], "--snap", "--size", "96x64"]) == 0
    assert Image.open(snapped).size == (90, 60)  # padded to 3:2 for editing, cropped back


def test_batch_writes_numbered_files(tmp_path, photo, kontext_dir):
    out = tmp_path / "b.png"
    assert main([str(photo), "add a red hat", "-o", str(out), "--kontext", str(kontext_dir), "--batch", "2", *COMMON]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"b_{i}.png")) for i in range(2))
    assert a.shape == (48, 64, 3) and not np.array_equal(a, b)


def test_single_files_as_comfyui_users_keep_them_match_the_directory(tmp_path, photo, kontext_dir):
    """BFL transformer + ae + t5xxl + clip_l files give the same image as the diffusers directory."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, T5EncoderModel

    files = tmp_path / "models"
    files.mkdir()
    tr = FluxTransformer2DModel.from_pretrained(kontext_dir / "transformer", local_files_only=True)
    bfl_layout.save(bfl_layout.flux_diffusers_to_bfl(tr.state_dict()), files / "flux1-kontext-dev.safetensors")
    vae = AutoencoderKL.from_pretrained(kontext_dir / "vae", local_files_only=True)
    bfl_layout.save(bfl_layout.vae_diffusers_to_ldm(vae.state_dict()), files / "ae.safetensors")
    t5 = T5EncoderModel.from_pretrained(kontext_dir / "text_encoder_2", local_files_only=True)
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}, files / "t5xxl_fp16.safetensors")
    clip = CLIPTextModel.from_pretrained(kontext_dir / "text_encoder", local_files_only=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, files / "clip_l.safetensors")

    from_dir, from_files = tmp_path / "dir.png", tmp_path / "files.png"
    assert main([str(photo), "add a red hat", "-o", str(from_dir), "--kontext", str(kontext_dir), *COMMON]) == 0
    assert main([
        str(photo), "add a red hat", "-o", str(from_files), "--mode", "t5",
        "--transformer", str(files / "flux1-kontext-dev.safetensors"), "--vae", str(files / "ae.safetensors"),
        "--t5", str(files / "t5xxl_fp16.safetensors"), "--clip", str(files / "clip_l.safetensors"),
        "--tokenizers", str(kontext_dir), *COMMON,
    ]) == 0
    assert np.array_equal(np.asarray(Image.open(from_dir)), np.asarray(Image.open(from_files)))


def _bad_cases(photo, tmp_path, gie_dir, kontext_dir):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    not_image = tmp_path / "not-an-image.png"
    not_image.write_text("hello")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiny)
    base = ["--kontext", str(kontext_dir), *COMMON]
    return [
        ([str(photo), "   ", *base], "instruction is empty"),
        ([str(photo), "add a hat", "--model", str(tmp_path / "missing"), *base], "does not exist"),
        ([str(photo), "add a hat", "--model", str(kontext_dir), *base], "not a GPT-Image-Edit checkpoint"),
        ([str(photo), "add a hat", "--kontext", str(gie_dir), *COMMON], "not a FLUX.1-Kontext diffusers directory"),
        ([str(photo), "add a hat", "--transformer", str(corrupt), *base], "not a valid safetensors file"),
        ([str(photo), "add a hat", "--transformer", str(tmp_path / "nope.safetensors"), *base], "does not exist"),
        ([str(not_image), "add a hat", *base], "not an image file"),
        ([str(tiny), "add a hat", *base], "at least 16 px"),
        ([str(photo), "add a hat", *base, "--size", "100x64"], "multiple of 16"),
        ([str(photo), "add a hat", *base, "--size", "big"], "WIDTHxHEIGHT"),
        ([str(photo), "add a hat", *base, "--snap", "--size", "64x64"], "does not have the 3:2 aspect"),
        ([str(photo), "add a hat", "--model", str(gie_dir), *base, "--mode", "vlm", "--batch", "0"], "batch size is 0 but must be in 1..64"),
    ]


def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, photo, gie_dir, kontext_dir, capsys):
    for i, (args, message) in enumerate(_bad_cases(photo, tmp_path, gie_dir, kontext_dir)):
        out = tmp_path / f"out{i}.png"
        assert main([*args[:2], "-o", str(out), *args[2:]]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        assert not out.exists()


def test_unknown_mode_is_rejected_by_the_parser(tmp_path, photo, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(photo), "add a hat", "-o", str(tmp_path / "x.png"), "--mode", "magic"])
    assert exc.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_existing_output_survives_a_failed_run(tmp_path, photo, kontext_dir):
    out = tmp_path / "keep.png"
    Image.new("RGB", (10, 10), (1, 2, 3)).save(out)
    before = out.read_bytes()
    assert main([str(photo), "", "-o", str(out), "--kontext", str(kontext_dir), *COMMON]) == 2
    assert out.read_bytes() == before


def test_fp8_single_file_transformer_loads_through_the_cli(tmp_path, photo, kontext_dir):
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(kontext_dir / "transformer", local_files_only=True)
    path = tmp_path / "flux1-kontext-dev-fp8.safetensors"
    bfl_layout.save(bfl_layout.to_fp8(bfl_layout.flux_diffusers_to_bfl(tr.state_dict())), path)
    from gie_core.weights.reader import CheckpointReader

    with CheckpointReader.open(path) as reader:
        assert {reader.dtype(k) for k in reader.keys()} == {torch.float8_e4m3fn}
    out = tmp_path / "fp8.png"
    assert main([str(photo), "add a hat", "-o", str(out), "--mode", "t5", "--transformer", str(path), "--kontext", str(kontext_dir), *COMMON]) == 0
    assert Image.open(out).size == (64, 48)


def test_connector_file_and_lora_change_the_edit(tmp_path, photo, gie_dir, kontext_dir):
    """Artifacts from gie-train (a connector file, a LoRA) plug into gie-edit."""
    from gie_core.engine.connector import Connector
    from gie_core.weights.loading import load_gie_checkpoint
    from gie_core.testing.tiny import build_tiny_lora
    from gie_core.weights.reader import save_safetensors_atomic

    stock = load_gie_checkpoint(gie_dir, dtype="fp32", parts=("connector",)).connector
    other = Connector(stock.input_hidden_size, stock.output_hidden_size)
    save_safetensors_atomic(other.state_dict(), tmp_path / "connector.safetensors")
    lora = build_tiny_lora(kontext_dir, tmp_path)
    base = [str(photo), "add a red hat", "--model", str(gie_dir), "--kontext", str(kontext_dir), *COMMON]
    outs = {}
    for name, extra in (("base", []), ("connector", ["--connector", str(tmp_path / "connector.safetensors")]),
                        ("lora", ["--lora", f"{lora}:0.8"]), ("lora0", ["--lora", f"{lora}:0"])):
        outs[name] = tmp_path / f"{name}.png"
        assert main([*base[:2], "-o", str(outs[name]), *base[2:], *extra]) == 0, name
    pix = {k: np.asarray(Image.open(v)) for k, v in outs.items()}
    assert not np.array_equal(pix["base"], pix["connector"])
    assert not np.array_equal(pix["base"], pix["lora"])
    assert np.array_equal(pix["base"], pix["lora0"])  # strength 0 is the base model


def test_split_files_from_gie_convert_edit_like_the_checkpoint_folder(tmp_path, photo, gie_dir, kontext_dir, capsys):
    """gie-edit on gie-convert's three files (--transformer, --qwen, --connector; no --model) makes the
    checkpoint folder's edit."""
    from gie_core.weights.convert import convert

    files = convert(gie_dir, tmp_path / "models", transformer_format="fp32", qwen_format="fp32")
    common = ["--kontext", str(kontext_dir), *COMMON]
    assert main([str(photo), "add a hat", "-o", str(tmp_path / "folder.png"), "--model", str(gie_dir), *common]) == 0
    split = ["--transformer", str(files["transformer"]), "--qwen", str(files["qwen"]), "--qwen-tokenizer", str(gie_dir),
             "--connector", str(files["connector"])]
    assert main([str(photo), "add a hat", "-o", str(tmp_path / "split.png"), *split, *common]) == 0, capsys.readouterr().err
    a = np.asarray(Image.open(tmp_path / "folder.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "split.png")).astype(int)
    assert np.abs(a - b).max() <= 1  # equal weights; CPU kernels may round the last float bit by alignment
    assert main([str(photo), "add a hat", "-o", str(tmp_path / "x.png"), "--qwen", str(files["qwen"]), *common]) == 2
    assert "--qwen and --connector" in capsys.readouterr().err
