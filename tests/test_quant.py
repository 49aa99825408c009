"""Lighter weights: fp8 storage (diffusers layerwise casting), GGUF files (written here with the
``gguf`` package from the tiny models, read through diffusers' GGUF quantizer) and bitsandbytes
Qwen; each loads, samples close to the full-precision model, and keeps LoRA and the connector
working on top. Byte ratios at real size are measured by ``bench/bench_quant.py``."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from PIL import Image

import bfl_layout
from gie_core.engine.conditioning import Conditioning
from gie_core.weights.gguf import GGUF_WRITE_TYPES, gguf_metadata, load_gguf_transformer, write_gguf
from gie_core.weights.loading import load_gie_checkpoint, load_kontext_dir
from gie_core.engine.components import module_bytes as resident_bytes
from gie_core.weights.parts import check_quantization, quantize_choices
from gie_core.engine.request import resolve_edit
from gie_core.engine.sampler import KontextModels, sample
from gie_core.weights.reader import CheckpointError

TRANSFORMER_QUANTIZATIONS = quantize_choices("transformer")
QWEN_QUANTIZATIONS = quantize_choices("qwen")

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def base(kontext_dir):
    """The tiny Kontext transformer in bf16, with VAE and scheduler."""
    c = load_kontext_dir(kontext_dir, dtype="bf16", parts=("transformer", "vae", "scheduler"))
    return c


@pytest.fixture(scope="module")
def bfl_state(kontext_dir):
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(kontext_dir / "transformer", local_files_only=True)
    return bfl_layout.flux_diffusers_to_bfl({k: v.float() for k, v in tr.state_dict().items()})


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, bfl_state):
    root = tmp_path_factory.mktemp("gguf")
    return {q: write_gguf(bfl_state, root / f"kontext-{q}.gguf", q, metadata={"gie.source": "tiny", "gie.step": 3})
            for q in ("Q8_0", "Q5_0", "Q4_0")}


def run(transformer, base, steps=6):
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 8, 32, generator=g), torch.randn(1, 64, generator=g))
    ref = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    request = resolve_edit(image_width=64, image_height=64, width=64, height=64, steps=steps, seed=1)
    return sample(KontextModels(transformer, base.vae, base.scheduler), cond, ref, request)


def psnr(a, b) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


# --- fp8 storage --------------------------------------------------------------------------


def test_fp8_transformer_streams_into_float8_and_samples_close_to_bf16(gie_dir, base):
    ck = load_gie_checkpoint(gie_dir, dtype="bf16", parts=("transformer",), transformer_quantize="fp8")
    ref = load_gie_checkpoint(gie_dir, dtype="bf16", parts=("transformer",))
    t = ck.transformer
    assert t.transformer_blocks[0].attn.to_q.weight.dtype == FP8
    assert t.transformer_blocks[0].norm1.linear.weight.dtype == FP8  # modulation too, as ComfyUI's fp8 files
    assert t.single_transformer_blocks[0].proj_out.weight.dtype == FP8
    for kept in (t.x_embedder, t.context_embedder, t.proj_out, t.norm_out.linear):
        assert kept.weight.dtype == torch.bfloat16
    assert t.transformer_blocks[0].attn.norm_q.weight.dtype == torch.bfloat16
    assert resident_bytes(t) < 0.75 * resident_bytes(ref.transformer)  # tiny: the kept layers weigh more
    assert psnr(run(t, base), run(ref.transformer, base)) >= 25


def test_fp8_qwen_encodes_close_to_bf16(gie_dir):
    img = Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype(np.uint8))
    fp8 = load_gie_checkpoint(gie_dir, dtype="bf16", parts=("encoder",), qwen_quantize="fp8").encoder
    ref = load_gie_checkpoint(gie_dir, dtype="bf16", parts=("encoder",)).encoder
    layer = fp8.model.model.language_model.layers[0]
    assert layer.self_attn.q_proj.weight.dtype == FP8 and layer.mlp.up_proj.weight.dtype == FP8
    assert fp8.model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    a, b = (e.encode(img, "add a red hat").hidden.float() for e in (fp8, ref))
    assert ((a - b).norm() / b.norm()).item() < 0.2


def test_lora_works_on_fp8_and_gguf_transformers(kontext_dir, gguf_files, tmp_path):
    from gie_core.weights.lora import activated, load_lora
    from gie_core.testing.tiny import build_tiny_lora

    lora = build_tiny_lora(kontext_dir, tmp_path)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 64, generator=g).bfloat16(),
              encoder_hidden_states=torch.randn(1, 8, 32, generator=g).bfloat16(),
              pooled_projections=torch.randn(1, 64, generator=g).bfloat16(), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)

    def effect(transformer):
        name = load_lora(transformer, lora)
        with torch.no_grad():
            with activated(transformer, []):
                off = transformer(**kw)[0].float()
            with activated(transformer, [(name, 1.0)]):
                on = transformer(**kw)[0].float()
        return on - off

    ref = effect(load_kontext_dir(kontext_dir, dtype="bf16", parts=("transformer",)).transformer)
    fp8 = load_kontext_dir(kontext_dir, dtype="bf16", parts=("transformer",), transformer_quantize="fp8").transformer
    gguf = load_gguf_transformer(gguf_files["Q8_0"], dtype=torch.bfloat16)
    for transformer in (fp8, gguf):
        got = effect(transformer)
        assert ((got - ref).norm() / ref.norm()).item() < 0.25


# --- GGUF ---------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype, bound_db", [("Q8_0", 40), ("Q5_0", 30), ("Q4_0", 25)])
def test_gguf_written_with_the_gguf_package_loads_quantised_and_samples(gguf_files, base, qtype, bound_db):
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    t = load_gguf_transformer(gguf_files[qtype], dtype=torch.bfloat16)
    q = t.transformer_blocks[0].attn.to_q
    assert isinstance(q, GGUFLinear) and isinstance(q.weight, GGUFParameter) and q.weight.quant_type.name == qtype
    assert not isinstance(t.x_embedder.weight, GGUFParameter)  # embedders stay unquantised (F16)
    assert resident_bytes(t) < resident_bytes(base.transformer)
    assert psnr(run(t, base), run(base.transformer, base)) >= bound_db


def test_gguf_metadata_and_layout(gguf_files, bfl_state):
    meta = gguf_metadata(gguf_files["Q8_0"])
    assert meta["general.architecture"] == "flux"  # what ComfyUI-GGUF detects
    assert meta["gie.source"] == "tiny" and meta["gie.step"] == 3
    from gguf import GGUFReader

    names = {t.name for t in GGUFReader(gguf_files["Q8_0"]).tensors}
    assert names == set(bfl_state)  # the BFL layout, every tensor, nothing else


def test_gguf_in_diffusers_layout_loads_too(base, tmp_path):
    sd = {k: v.float() for k, v in base.transformer.state_dict().items()}
    path = write_gguf(sd, tmp_path / "diffusers-layout.gguf", "Q8_0")
    t = load_gguf_transformer(path, dtype=torch.bfloat16)
    assert psnr(run(t, base), run(base.transformer, base)) >= 40


def test_write_gguf_streams_entries_once_each_and_is_atomic(bfl_state, tmp_path):
    made = []

    class Entry:
        def __init__(self, key, tensor):
            self.key, self.shape, self._t = key, tuple(tensor.shape), tensor

        def make(self):
            made.append(self.key)
            return self._t

    path = tmp_path / "streamed.gguf"
    write_gguf([Entry(k, v) for k, v in bfl_state.items()], path, "Q8_0")
    assert sorted(made) == sorted(bfl_state)
    good = path.read_bytes()

    class Failing(Entry):
        def make(self):
            raise KeyboardInterrupt  # killed mid-write

    entries = [Entry(k, v) for k, v in bfl_state.items()]
    entries[len(entries) // 2] = Failing(entries[len(entries) // 2].key, bfl_state[entries[len(entries) // 2].key])
    with pytest.raises(KeyboardInterrupt):
        write_gguf(entries, path, "Q8_0")
    assert path.read_bytes() == good  # the complete file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["streamed.gguf"]  # no partial file left
    with pytest.raises(ValueError, match="cannot be written"):
        write_gguf(bfl_state, tmp_path / "k.gguf", "Q4_K")
    assert set(GGUF_WRITE_TYPES) >= {"Q8_0", "Q4_0", "Q5_0"}


def test_not_a_gguf_or_not_a_transformer_is_named(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        load_gguf_transformer(fake)
    other = write_gguf({"foo.weight": torch.randn(64, 64)}, tmp_path / "other.gguf", "Q8_0")
    with pytest.raises(CheckpointError, match="is not a FLUX transformer GGUF file"):
        load_gguf_transformer(other)


def test_cli_edits_with_a_gguf_transformer_and_fp8_qwen(tmp_path, gguf_files, gie_dir, kontext_dir):
    from gie_core.cli.edit import main

    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.RandomState(1).rand(48, 64, 3) * 255).astype(np.uint8)).save(photo)
    common = ["--steps", "2", "--size", "64x48", "--reference-size", "keep", "--dtype", "bf16", "--device", "cpu", "--quiet"]
    out = tmp_path / "gguf.png"
    assert main([str(photo), "add a red hat", "-o", str(out), "--model", str(gie_dir), "--kontext", str(kontext_dir),
                 "--transformer", str(gguf_files["Q4_0"]), "--quantize-qwen", "fp8", *common]) == 0
    assert Image.open(out).size == (64, 48)


def test_quantization_choices_are_checked_before_loading(tmp_path, gguf_files, kontext_dir, monkeypatch, capsys):
    from gie_core.cli.edit import main
    from gie_core.engine.pipeline import EditPipeline

    assert "fp8" in TRANSFORMER_QUANTIZATIONS and {"fp8", "int8", "nf4"} <= set(QWEN_QUANTIZATIONS)
    with pytest.raises(ValueError, match="not available for the transformer"):
        check_quantization("transformer", "nf4")
    with pytest.raises(ValueError, match="quantization 'int4' is unknown"):
        check_quantization("qwen", "int4")
    monkeypatch.setattr(EditPipeline, "from_paths", lambda *a, **k: pytest.fail("weights were loaded"))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48)).save(photo)
    rc = main([str(photo), "add a hat", "-o", str(tmp_path / "o.png"), "--kontext", str(kontext_dir), "--mode", "t5",
               "--transformer", str(gguf_files["Q8_0"]), "--quantize-transformer", "fp8", "--device", "cpu"])
    assert rc == 2 and "is a GGUF file, quantised already" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes (extra 'bnb') is not installed")
def test_int8_qwen_through_bitsandbytes_encodes_close_to_bf16(gie_dir):
    img = Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype(np.uint8))
    try:
        q = load_gie_checkpoint(gie_dir, dtype="bf16", parts=("encoder",), qwen_quantize="int8").encoder
    except (RuntimeError, NotImplementedError, ImportError) as exc:  # a bitsandbytes build without CPU kernels
        pytest.skip(f"bitsandbytes cannot run here: {exc}")
    ref = load_gie_checkpoint(gie_dir, dtype="bf16", parts=("encoder",)).encoder
    assert type(q.model.model.language_model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    assert not q.model.lm_head.loaded  # the output head waits for rewriting here too
    a, b = (e.encode(img, "add a red hat").hidden.float() for e in (q, ref))
    assert ((a - b).norm() / b.norm()).item() < 0.1
