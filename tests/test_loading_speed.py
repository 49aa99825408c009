"""Load only what a run uses, at disk speed: weights already in their final form are the file's
own pages (copy-on-write), Qwen's lm_head is read only when text is generated, the connector is
streamed like the rest. Load time and memory against ``from_pretrained`` are measured by
``bench/bench_loading.py``."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gie_core.weights.loading import OnDemandLMHead, load_connector, load_gie_checkpoint, load_kontext_dir
from gie_core.engine.components import module_bytes as resident_bytes
from gie_core.weights.gguf import load_gguf_transformer, write_gguf
from gie_core.weights.reader import CheckpointReader


def _file_tensor(gie_dir, key):
    index = json.loads((gie_dir / "model.safetensors.index.json").read_text())
    with safe_open(gie_dir / index["weight_map"][key], "pt") as f:
        return f.get_tensor(key)


def _mapped_range(reader: CheckpointReader, key: str) -> tuple[int, int]:
    f = reader.file_of(key)
    base = np.frombuffer(f._mapping(), dtype=np.uint8).ctypes.data
    return base, base + f._size


def test_weights_in_their_final_dtype_are_the_files_pages_and_stay_private(gie_dir):
    key = "denoise_tower.denoiser.x_embedder.weight"
    with CheckpointReader.open(gie_dir) as reader:
        lo, hi = _mapped_range(reader, key)
        (name, view), = list(reader.iter_loaded([key], torch.float32, "cpu"))
        assert lo <= view.data_ptr() < hi  # no copy: the file's own (page-cache) pages
        cast = reader.load(key, torch.bfloat16, "cpu")
        assert not lo <= cast.data_ptr() < hi and cast.dtype == torch.bfloat16
    ck = load_gie_checkpoint(gie_dir, dtype="fp32", parts=("transformer",))
    weight = ck.transformer.x_embedder.weight
    original = weight.detach().clone()
    assert torch.equal(original, _file_tensor(gie_dir, key))
    with torch.no_grad():
        weight.add_(1.0)  # e.g. a training step: changes this process's copy only
    assert torch.equal(_file_tensor(gie_dir, key), original)
    again = load_gie_checkpoint(gie_dir, dtype="fp32", parts=("transformer",)).transformer.x_embedder.weight
    assert torch.equal(again, original)


def test_reader_yields_every_tensor_once_in_file_order(gie_dir):
    with CheckpointReader.open(gie_dir) as reader:
        keys = reader.keys()
        for read_ahead in (False, True):  # with the kernel asked to read ahead, or not
            got = [k for k, _ in reader.iter_loaded(reversed(keys), torch.float32, "cpu", read_ahead=read_ahead,
                                                    max_ahead_bytes=1)]
            assert sorted(got) == sorted(keys)
            assert got == sorted(keys, key=reader.offset)


def test_lm_head_is_read_only_when_text_is_generated(gie_dir):
    from gie_core.engine.rewrite import generate_rewrite

    lazy = load_gie_checkpoint(gie_dir, dtype="fp32", parts=("encoder",)).encoder
    eager = load_gie_checkpoint(gie_dir, dtype="fp32", parts=("encoder",), lm_head=True).encoder
    head = lazy.model.lm_head
    assert isinstance(head, OnDemandLMHead) and not head.loaded
    lm_bytes = eager.model.lm_head.weight.numel() * 4
    assert resident_bytes(eager.model) - resident_bytes(lazy.model) == lm_bytes
    img = Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype(np.uint8))
    assert torch.equal(lazy.encode(img, "add a hat").hidden, eager.encode(img, "add a hat").hidden)
    assert not head.loaded  # encoding never needs it
    text_lazy = generate_rewrite(lazy, img, "add a hat", max_new_tokens=6)
    assert head.loaded and torch.equal(head.weight, _file_tensor(gie_dir, "lm_head.weight"))
    assert text_lazy == generate_rewrite(eager, img, "add a hat", max_new_tokens=6)  # the same greedy text


def test_connector_is_streamed_without_a_random_initialisation(gie_dir, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    init = torch.nn.Linear.reset_parameters

    def meta_only(self):
        assert self.weight.is_meta, "a randomly initialised connector was built in memory"
        init(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", meta_only)
    prefix = "denoise_tower.denoise_projector."
    conn = load_gie_checkpoint(gie_dir, dtype="bf16", parts=("connector",)).connector
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        got = conn.state_dict()[f"denoise_projector.{name}"]
        assert got.dtype == torch.bfloat16 and torch.equal(got, _file_tensor(gie_dir, prefix + name).bfloat16())
    # a trainer's connector file with learned queries and a type embedding
    state = {k: v.float() for k, v in conn.state_dict().items()}
    state.update(queries=torch.randn(4, conn.input_hidden_size), type_embedding=torch.randn(2, conn.output_hidden_size))
    save_file(state, tmp_path / "connector.safetensors")
    loaded = load_connector(tmp_path / "connector.safetensors", dtype="fp32")
    assert loaded.queries.shape == (4, conn.input_hidden_size) and torch.equal(loaded.type_embedding, state["type_embedding"])
    assert "metaquery" in loaded.modes


def test_a_truncated_shard_is_still_refused(gie_dir, tmp_path):
    import shutil

    from gie_core.weights.reader import CheckpointError

    copy = tmp_path / "ckpt"
    shutil.copytree(gie_dir, copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gie_checkpoint(copy, dtype="fp32")


# --------------------------------------------------------------------------------------------
# What stays in memory after a load, and casting loads against the libraries' own loaders
# --------------------------------------------------------------------------------------------

needs_proc_maps = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")


def _mapped(paths) -> list[str]:
    """The files among ``paths`` that this process still maps (after freeing what nobody holds)."""
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    return sorted(str(p) for p in paths if str(p) in maps)


def _bf16_copy(src: Path, dst: Path) -> Path:
    """``src`` (a model folder) with every safetensors file rewritten in bf16 and the other files copied."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, dst / f.name, metadata={"format": "pt"})
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def bf16_kontext(kontext_dir, tmp_path_factory):
    """A FLUX.1-Kontext folder whose transformer and VAE files are bf16 (as the released ones are)."""
    root = tmp_path_factory.mktemp("kontext-bf16") / "kontext"
    root.mkdir()
    shutil.copy(kontext_dir / "model_index.json", root / "model_index.json")
    for part in ("transformer", "vae"):
        _bf16_copy(kontext_dir / part, root / part)
    return root


@pytest.fixture(scope="module")
def bf16_gie(gie_dir, tmp_path_factory):
    """The released-layout checkpoint with its shards in bf16."""
    return _bf16_copy(gie_dir, tmp_path_factory.mktemp("gie-bf16") / "gie")


def _equal_state(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@needs_proc_maps
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_casting_load_equals_diffusers_and_leaves_no_mapping_of_the_file(bf16_kontext, dtype):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    files = sorted(bf16_kontext.glob("*/*.safetensors"))
    c = load_kontext_dir(bf16_kontext, dtype=dtype, parts=("transformer", "vae"))
    assert _mapped(files) == []  # every tensor was cast: nothing of the bf16 files stays
    for ours, cls, part in ((c.transformer, FluxTransformer2DModel, "transformer"), (c.vae, AutoencoderKL, "vae")):
        _equal_state(ours, cls.from_pretrained(bf16_kontext / part, torch_dtype=dtype, use_safetensors=True))
    # the same files loaded at their stored dtype are their own pages (and equal diffusers' too)
    same = load_kontext_dir(bf16_kontext, dtype=torch.bfloat16, parts=("transformer",)).transformer
    assert _mapped(files) == [str(bf16_kontext / "transformer" / "diffusion_pytorch_model.safetensors")]
    _equal_state(same, FluxTransformer2DModel.from_pretrained(bf16_kontext / "transformer", torch_dtype=torch.bfloat16))


@needs_proc_maps
def test_fp8_loads_keep_no_mapping_of_the_bf16_source(bf16_kontext, bf16_gie):
    from gie_core.weights.parts import load_part

    files = sorted(bf16_kontext.glob("*/*.safetensors")) + sorted(bf16_gie.glob("*.safetensors"))
    kontext = load_part("transformer", bf16_kontext, storage="fp8", dtype="bf16").module
    released = load_part("transformer", bf16_gie, storage="fp8", dtype="bf16").module
    qwen = load_gie_checkpoint(bf16_gie, dtype="bf16", parts=("encoder",), qwen_quantize="fp8").encoder.model
    for model in (kontext, released, qwen):
        dtypes = {p.dtype for p in model.parameters()}
        assert dtypes == {torch.float8_e4m3fn, torch.bfloat16}  # fp8 blocks, the kept layers in bf16
    assert _mapped(files) == []
    # the same transformer as one file (as ComfyUI users keep it) stores the same fp8 bytes
    single = bf16_kontext.parent / "kontext-transformer.safetensors"
    shutil.copy(bf16_kontext / "transformer" / "diffusion_pytorch_model.safetensors", single)
    _equal_state(load_part("transformer", single, storage="fp8", dtype="bf16").module, kontext)


@needs_proc_maps
def test_a_gguf_load_keeps_no_mapping_of_the_file(kontext_dir, tmp_path):
    from diffusers import FluxTransformer2DModel

    import bfl_layout

    tr = FluxTransformer2DModel.from_pretrained(kontext_dir / "transformer", local_files_only=True)
    path = write_gguf(bfl_layout.flux_diffusers_to_bfl(tr.state_dict()), tmp_path / "kontext-Q8_0.gguf", "Q8_0")
    model = load_gguf_transformer(path, dtype=torch.bfloat16)
    assert any(type(p).__name__ == "GGUFParameter" for p in model.parameters())
    assert _mapped([path]) == []


@needs_proc_maps
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_compute_quantises_each_weight_as_it_is_read(bf16_kontext, monkeypatch, dtype):
    # fp8_e4m3fn_fast streams: each linear weight is quantised (in chunks of rows, the pages of
    # the file dropped as read) while the file is read, never the whole model held in the compute
    # dtype first; the values equal diffusers' loader followed by quantising each layer whole.
    from diffusers import FluxTransformer2DModel

    from gie_core.weights import fp8_compute
    from gie_core.weights.parts import load_part

    files = sorted(bf16_kontext.glob("transformer/*.safetensors"))
    monkeypatch.setattr(fp8_compute, "QUANTIZE_CHUNK_ELEMENTS", 64)  # many chunks per weight
    streamed = load_part("transformer", bf16_kontext, "fp8_e4m3fn_fast", dtype=dtype).module
    assert _mapped(files) == []  # nothing of the bf16 file stays mapped, the kept bf16 layers included
    assert any(isinstance(m, fp8_compute.Fp8Linear) for m in streamed.modules())
    ref = FluxTransformer2DModel.from_pretrained(bf16_kontext / "transformer", torch_dtype=dtype, local_files_only=True,
                                                 use_safetensors=True)
    monkeypatch.setattr(fp8_compute, "QUANTIZE_CHUNK_ELEMENTS", 2**30)  # whole weights at once
    fp8_compute.prepare_fp8_compute(ref, dtype, "transformer")
    _equal_state(streamed, ref)


def test_release_view_drops_only_a_files_own_pages(bf16_kontext):
    path = next(bf16_kontext.glob("transformer/*.safetensors"))
    with CheckpointReader.open(path) as reader:
        key = max(reader.keys(), key=reader.nbytes)
        view = reader.load(key)  # the file's pages, as stored
        values = view.clone()
        assert reader.release_view(view)  # its pages leave the process ...
        assert torch.equal(view, values)  # ... and come back from the file when read again
        copy = reader.load(key, torch.float32)
        assert not reader.release_view(copy)  # a copy is never touched
        assert torch.equal(copy, values.float())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_a_gguf_load_equals_diffusers_reader_split_afterwards(kontext_dir, tmp_path, monkeypatch, qtype):
    # Fused BFL tensors (qkv, linear1) are read straight into their parts, row ranges of the
    # file, and F16/F32 tensors are cast through a small buffer; the result must be what
    # diffusers' own GGUF reader gives, split and cast afterwards, byte for byte.
    from diffusers import FluxTransformer2DModel
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    import bfl_layout
    from gie_core.weights import gguf as gguf_module
    from gie_core.weights.single_file import bfl_flux_key_to_diffusers

    tr = FluxTransformer2DModel.from_pretrained(kontext_dir / "transformer", local_files_only=True)
    path = write_gguf(bfl_layout.flux_diffusers_to_bfl(tr.state_dict()), tmp_path / f"kontext-{qtype}.gguf", qtype)
    monkeypatch.setattr(gguf_module, "CAST_CHUNK_BYTES", 256)  # several chunks per cast tensor, one partial
    ours = dict(load_gguf_transformer(path, dtype=torch.bfloat16).state_dict())
    inner = tr.config.num_attention_heads * tr.config.attention_head_dim
    mlp = tr.single_transformer_blocks[0].proj_mlp.out_features
    theirs = {}
    for key, tensor in load_gguf_checkpoint(str(path)).items():
        for name, part in bfl_flux_key_to_diffusers(key, tensor, inner_dim=inner, mlp_hidden_dim=mlp):
            theirs[name] = part
    assert sorted(ours) == sorted(theirs)
    quantised = 0
    for name, got in ours.items():
        want = theirs[name]
        if type(want).__name__ == "GGUFParameter":
            quantised += 1
            assert type(got).__name__ == "GGUFParameter" and got.quant_type == want.quant_type, name
            assert torch.equal(got.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor)), name
        else:
            assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16)), name
    assert quantised > 0


@needs_proc_maps
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_released_qwen_equals_transformers_loader(bf16_gie, dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from gie_core.weights.loading import gie_config, qwen_config_from_gie

    ours = load_gie_checkpoint(bf16_gie, dtype=dtype, parts=("encoder",), lm_head=True).encoder.model
    shards = sorted(bf16_gie.glob("*.safetensors"))
    assert (_mapped(shards) == []) == (dtype != torch.bfloat16)  # a cast leaves nothing mapped; bf16 is the files' pages
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        bf16_gie, config=qwen_config_from_gie(gie_config(bf16_gie)), dtype=dtype, local_files_only=True,
        use_safetensors=True)
    _equal_state(ours, theirs)


def test_a_tensor_copied_in_chunks_equals_one_cast(gie_dir):
    # large tensors (beyond WHOLE_COPY_BYTES) are cast page-aligned chunk by chunk
    with CheckpointReader.open(gie_dir) as reader:
        key = max(reader.keys(), key=reader.nbytes)
        f = reader.file_of(key)
        assert f.nbytes(key) > 3 * 4096  # several chunks, the last one partial
        out = f.copy_into(key, torch.empty(reader.shape(key), dtype=torch.bfloat16), chunk_bytes=4096)
        assert torch.equal(out, reader.read(key).to(torch.bfloat16))
