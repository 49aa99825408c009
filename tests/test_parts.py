"""One way in for weights: gie_core.weights.parts resolves every source, checks every choice
before a weight is read, and is the one module that decides file formats; one dtype table and
one defaults table per door."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import bfl_layout
from gie_core import constants
from gie_core.engine.connector import Connector
from gie_core.engine.encoders import QwenVLEncoder
from gie_core.weights import parts, quantize
from gie_core.weights.convert import convert
from gie_core.weights.gguf import gguf_metadata, write_gguf
from gie_core.weights.loading import load_kontext_dir, parse_dtype
from gie_core.weights.parts import STORAGE_TABLE, check_load, load_part, resolve_source
from gie_core.weights.quantize import TENSOR_SOURCES, Storage
from gie_core.weights.reader import CheckpointError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(gie_dir, kontext_dir, tmp_path_factory):
    """Single files of every part: gie-convert's (transformer, Qwen, connector), the Kontext
    folder's VAE / T5 / CLIP saved as single files, a GGUF transformer and a LoRA."""
    root = tmp_path_factory.mktemp("parts")
    split = convert(gie_dir, root, transformer_format="fp32", qwen_format="fp32", lm_head=True, name="t")
    k = load_kontext_dir(kontext_dir, dtype="fp32", parts=("transformer", "vae", "clip", "t5"))
    out = {"transformer": split["transformer"], "qwen": split["qwen"], "connector": split["connector"]}
    for name, module in (("vae", k.vae), ("t5", k.text.t5), ("clip", k.text.clip)):
        state = {key: v.contiguous() for key, v in module.state_dict().items() if key != "encoder.embed_tokens.weight"}
        out[name] = root / f"{name}.safetensors"
        save_file(state, out[name])
    bfl = bfl_layout.flux_diffusers_to_bfl({key: v.float() for key, v in k.transformer.state_dict().items()})
    out["gguf"] = write_gguf(bfl, root / "kontext-Q8_0.gguf", "Q8_0")
    from gie_core.testing.tiny import build_tiny_lora

    out["lora"] = build_tiny_lora(kontext_dir, root)
    return out


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def test_sources_are_recognised_by_what_they_hold(files, gie_dir, kontext_dir):
    assert (resolve_source(gie_dir).kind, resolve_source(gie_dir).holds) == ("gie_dir", ("transformer", "qwen", "connector"))
    assert resolve_source(kontext_dir).holds == ("transformer", "vae", "clip", "t5")
    for part in ("transformer", "qwen", "connector", "vae", "t5", "clip"):
        src = resolve_source(files[part])
        assert (src.kind, src.holds) == ("file", (part,)), part
    assert resolve_source(files["transformer"]).layout == "bfl_transformer"
    assert (resolve_source(files["gguf"]).kind, resolve_source(files["gguf"]).holds) == ("gguf", ("transformer",))
    assert resolve_source(files["lora"], "lora").holds == ("lora",)


@pytest.mark.parametrize("part, where, module_type", [
    ("transformer", "gie_dir", "FluxTransformer2DModel"),
    ("transformer", "kontext_dir", "FluxTransformer2DModel"),
    ("transformer", "transformer", "FluxTransformer2DModel"),
    ("transformer", "gguf", "FluxTransformer2DModel"),
    ("qwen", "gie_dir", "QwenVLEncoder"),
    ("qwen", "qwen", "QwenVLEncoder"),
    ("vae", "kontext_dir", "AutoencoderKL"),
    ("vae", "vae", "AutoencoderKL"),
    ("t5", "kontext_dir", "T5EncoderModel"),
    ("t5", "t5", "T5EncoderModel"),
    ("clip", "kontext_dir", "CLIPTextModel"),
    ("clip", "clip", "CLIPTextModel"),
    ("connector", "gie_dir", "Connector"),
    ("connector", "connector", "Connector"),
])
def test_every_part_loads_from_every_source_that_holds_it(part, where, module_type, files, gie_dir, kontext_dir,
                                                          tokenizer_dirs):
    """The same call for every source; the folder's part and the single file's are the same weights."""
    path = {"gie_dir": gie_dir, "kontext_dir": kontext_dir}.get(where) or files[where]
    options = {}
    if where in ("qwen", "t5", "clip"):
        options["tokenizer_dir"] = {"qwen": gie_dir, "t5": tokenizer_dirs.t5, "clip": tokenizer_dirs.clip}[where]
    loaded = load_part(part, path, dtype="fp32", **options)
    assert type(loaded.module).__name__ == module_type
    assert loaded.part == part and str(path) in loaded.decided
    if part in ("qwen", "t5", "clip"):
        assert loaded.tokenizer is not None
    if part == "qwen":
        assert loaded.processor is loaded.module.image_processor
    reference = {"transformer": gie_dir, "qwen": gie_dir, "connector": gie_dir}.get(part, kontext_dir)
    if where not in ("gguf", "gie_dir", "kontext_dir"):  # a single file equals its folder's part
        ref = load_part(part, reference, dtype="fp32").module
        ref_module = ref.model if isinstance(ref, QwenVLEncoder) else ref
        module = loaded.module.model if isinstance(loaded.module, QwenVLEncoder) else loaded.module
        ref_state = ref_module.state_dict()
        for key, value in module.state_dict().items():
            if key in ref_state and value.is_floating_point():
                assert torch.equal(value, ref_state[key]), (part, key)
    if where == "gguf":
        assert loaded.storage == "gguf" and "as stored" in loaded.decided


def test_one_connector_loader_for_every_door(files, gie_dir):
    """The checkpoint's connector and gie-convert's file load alike, the file's mode kept."""
    from_dir = load_part("connector", gie_dir, dtype="fp32").module
    from_file = load_part("connector", files["connector"], dtype="fp32").module
    assert isinstance(from_file, Connector)
    assert all(torch.equal(a, b) for a, b in zip(from_dir.state_dict().values(), from_file.state_dict().values()))
    assert from_file.default_mode == "vlm+t5"
    with pytest.raises(CheckpointError, match=r"vae.safetensors \(a safetensors file, vae\) holds no connector"):
        load_part("connector", files["vae"])


def test_a_lora_joins_its_transformer(files, kontext_dir):
    transformer = load_part("transformer", kontext_dir, dtype="fp32").module
    loaded = load_part("lora", files["lora"], transformer=transformer)
    assert loaded.adapter in transformer.peft_config and loaded.module is transformer
    with pytest.raises(TypeError, match="takes no option tokenizer_dir"):
        load_part("lora", files["lora"], transformer=transformer, tokenizer_dir=kontext_dir)


# ---------------------------------------------------------------------------------------------
# Checked before any weight is read
# ---------------------------------------------------------------------------------------------


def test_every_choice_is_checked_before_a_weight_is_read(files, gie_dir, kontext_dir, monkeypatch):
    from gie_core.weights import reader

    def no_reading(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(reader.SafetensorsFile, "read", no_reading)
    monkeypatch.setattr(reader.CheckpointReader, "iter_loaded", no_reading)
    cases = [
        (lambda: check_load("vae", gie_dir), "holds no vae: expected a FLUX VAE; it holds transformer, qwen, connector"),
        (lambda: check_load("head", gie_dir), "part 'head' is unknown"),
        (lambda: check_load("transformer", files["transformer"], "nf4"),
         "transformer quantization 'nf4' is not available for the transformer"),
        (lambda: check_load("transformer", files["gguf"], "fp8"), "is a GGUF file, quantised already"),
        (lambda: check_load("transformer", kontext_dir, "gguf"), "'gguf' does not apply to"),
        (lambda: check_load("vae", kontext_dir, "fp8"), "vae quantization 'fp8' is not available for the vae"),
        (lambda: check_load("transformer", kontext_dir, "int4"), "quantization 'int4' is unknown"),
        (lambda: check_load("transformer", kontext_dir, "bf16", dtype="fp32"), "computes in bf16; dtype 'fp32' contradicts it"),
        (lambda: check_load("qwen", files["qwen"]), "needs tokenizer_dir"),
        (lambda: check_load("t5", files["t5"], tokenizer_dir=files["t5"].parent / "nope"), "is not a folder"),
        (lambda: check_load("transformer", files["qwen"]), "holds no transformer"),
        (lambda: check_load("vae", files["vae"].parent / "missing.safetensors"), "missing.safetensors does not exist"),
    ]
    if not quantize.package_available("bitsandbytes"):
        cases.append((lambda: check_load("qwen", gie_dir, "int8"), "needs bitsandbytes, which is not installed"))
    cases.append((lambda: check_load("qwen", files["qwen"], "nf4", tokenizer_dir=gie_dir),
                  "(bitsandbytes) needs the checkpoint folder"))
    for call, message in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert message in str(info.value), message
    plan = check_load("qwen", gie_dir, "fp8", dtype="bf16")  # a good choice: checked, nothing read
    assert plan.storage.name == "fp8" and plan.dtype == torch.bfloat16 and plan.device == torch.device("cpu")


def test_bitsandbytes_loads_where_it_runs(gie_dir, monkeypatch):
    """A bnb row loads straight onto the run device (its weights cannot move afterwards); other
    storages load on the CPU and visit the device when used; a device bnb cannot run is refused."""
    monkeypatch.setattr(parts, "package_available", lambda name: True)  # the plan only; nothing loads
    monkeypatch.setattr(parts, "import_problem", lambda name, install: "")
    assert check_load("qwen", gie_dir, "int8", run_device="cuda:0").device == torch.device("cuda:0")
    assert check_load("qwen", gie_dir, "nf4", run_device="cuda:0").device == torch.device("cuda:0")
    assert check_load("qwen", gie_dir, "fp8", run_device="cuda:0").device == torch.device("cpu")
    with pytest.raises(ValueError, match="qwen quantization 'int8' \\(bitsandbytes\\) runs on cuda or cpu devices, not on 'mps'"):
        check_load("qwen", gie_dir, "int8", run_device="mps")


def test_a_folder_with_only_bin_weights_is_refused(tmp_path, kontext_dir):
    qwen = tmp_path / "qwen-bin"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (qwen / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"qwen-bin holds its weights as \.bin/\.pt pickles only"):
        load_part("qwen", qwen)
    import shutil

    kontext = tmp_path / "kontext-bin"
    shutil.copytree(kontext_dir, kontext)
    for f in (kontext / "vae").glob("*.safetensors"):
        f.rename(f.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"kontext-bin/vae holds its weights as \.bin/\.pt pickles only"):
        load_part("vae", kontext)


def test_a_truncated_gguf_file_is_named_with_what_is_wrong(files, tmp_path):
    data = files["gguf"].read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in (len(data) // 2, 64):  # tensor data missing; header itself cut
        cut.write_bytes(data[:size])
        for call in (lambda: load_part("transformer", cut), lambda: gguf_metadata(cut)):
            with pytest.raises(CheckpointError) as info:
                call()
            message = str(info.value)
            assert str(cut) in message and "truncated" in message and "reshape" not in message, message


# ---------------------------------------------------------------------------------------------
# Storage kinds are rows
# ---------------------------------------------------------------------------------------------


def test_a_new_storage_row_loads_through_load_part(monkeypatch, kontext_dir):
    """A storage kind is one row: here float8 e5m2 for the transformer, offered by the faces and
    loaded by load_part with nothing else changed."""
    from gie_core.cli.edit import build_parser

    row = Storage("fp8_e5m2", "float8 e5m2 storage, upcast per layer", ("transformer",), TENSOR_SOURCES, "layerwise",
                  torch.float8_e5m2, quantizes=True)
    monkeypatch.setitem(STORAGE_TABLE, row.name, row)
    assert "fp8_e5m2" in parts.quantize_choices("transformer") and "fp8_e5m2" not in parts.quantize_choices("qwen")
    args = build_parser().parse_args(["-o", "x.png", "--quantize-transformer", "fp8_e5m2"])
    assert args.quantize_transformer == "fp8_e5m2"
    loaded = load_part("transformer", kontext_dir, "fp8_e5m2", dtype="fp32")
    dtypes = {p.dtype for p in loaded.module.parameters()}
    assert torch.float8_e5m2 in dtypes and torch.float32 in dtypes  # blocks stored small, FP8_KEEP layers not
    with pytest.raises(ValueError, match="qwen quantization 'fp8_e5m2' is not available for the qwen"):
        check_load("qwen", kontext_dir.parent / "gie", "fp8_e5m2")


# Functions that decide or read a file format: only gie_core/weights (parts.py dispatching to the
# format modules) may call them; the pipeline, the CLIs, the nodes, the trainer and eval name parts.
FORMAT_DECISIONS = {
    "is_gguf", "detect_single_file_kind", "file_kinds", "open_checked", "load_gguf_transformer", "load_bfl_transformer",
    "load_bfl_vae", "load_t5_encoder", "load_clip_text", "load_qwen_file", "load_qwen_dir", "load_gie_checkpoint",
    "load_kontext_dir", "load_connector", "load_connector_file", "load_lora", "prepare_fp8_storage", "bnb_config",
    "package_available", "load_text_encoder_files",
}


def _calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in FORMAT_DECISIONS:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
        if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value == ".gguf"
                                                 for c in ast.walk(node)):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} compares with '.gguf'")
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "endswith"
                and any(isinstance(a, ast.Constant) and a.value == ".gguf" for a in node.args)):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} endswith('.gguf')")
    return found


def test_one_module_decides_formats():
    """Adding a storage kind or a file format touches gie_core/weights only."""
    faces = [p for d in ("gie_core/engine", "gie_core/cli", "gie_core/train", "gie_core/eval", "nodes")
             for p in (REPO / d).rglob("*.py")]
    assert faces and [hit for p in faces for hit in _calls(p)] == []
    # and within gie_core/weights, the readers never pick a source: only parts.py calls resolve-time checks
    weights = [p for p in (REPO / "gie_core" / "weights").glob("*.py") if p.name != "parts.py"]
    picks = [f"{p.name}:{n.lineno}" for p in weights for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", "")) in
             ("is_gguf", "detect_single_file_kind", "file_kinds")]
    assert picks == []


# ---------------------------------------------------------------------------------------------
# One dtype table, one defaults table per door
# ---------------------------------------------------------------------------------------------


def test_each_door_reads_its_defaults_from_the_table():
    from gie_core.cli.common import device_and_dtype
    from gie_core.cli.edit import build_parser
    from gie_core.engine.pipeline import EditPipeline, plan_paths
    from gie_core.train.config import TrainConfig
    from nodes.common import DTYPE_INPUT, OFFLOAD_INPUT

    d = constants.LOAD_DEFAULTS
    assert set(d) == {"library", "cli", "nodes", "trainer"} and all(row.reason for row in d.values())
    args = build_parser().parse_args(["-o", "x.png"])
    assert (args.dtype, args.offload) == (d["cli"].dtype, d["cli"].offload)
    assert (DTYPE_INPUT[1]["default"], OFFLOAD_INPUT[1]["default"]) == (d["nodes"].dtype, d["nodes"].offload)
    assert inspect.signature(plan_paths).parameters["dtype"].default == d["library"].dtype
    assert inspect.signature(EditPipeline.from_paths).parameters["offload"].default == d["library"].offload
    assert TrainConfig().train.mixed_precision == d["trainer"].dtype
    # "auto" (the CLI's) is fp32 on the CPU; the library's None is its row
    assert device_and_dtype("cpu", None) == (torch.device("cpu"), "fp32")
    assert parts.resolve_dtype(None) == parse_dtype(d["library"].dtype)
    assert parts.resolve_dtype("auto", "cuda") == torch.bfloat16


def test_one_dtype_table_for_every_door():
    from gie_core.cli.edit import build_parser
    from gie_core.train.config import MIXED_PRECISION
    from nodes.common import DTYPE_INPUT

    names = constants.DTYPE_NAMES
    dtype_action = next(a for a in build_parser()._actions if a.dest == "dtype")
    assert list(dtype_action.choices) == [constants.AUTO_DTYPE, *names]
    assert DTYPE_INPUT[0] == list(names)
    assert {parse_dtype(n) for n in names} == {torch.bfloat16, torch.float16, torch.float32}
    assert MIXED_PRECISION == tuple(constants.MIXED_PRECISION_DTYPES)
    assert [parse_dtype(mp) for mp in MIXED_PRECISION] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="dtype 'fp64' is unknown; expected one of bf16, fp16, fp32"):
        parse_dtype("fp64")
    # no door spells the names or their torch dtypes out again
    sources = {p: p.read_text() for d in ("gie_core", "nodes") for p in (REPO / d).rglob("*.py")}
    spelled = [str(p.relative_to(REPO)) for p, text in sources.items()
               if any(m in text for m in ('"bf16": torch.bfloat16', '"no": torch.float32', '("bf16", "fp16", "fp32")'))]
    assert spelled == []
