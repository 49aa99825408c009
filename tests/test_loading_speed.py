"""Load only what a run uses, at disk speed: weights already in their final form are the file's
own pages (copy-on-write), Qwen's lm_head is read only when text is generated, the connector is
streamed like the rest. Load time and memory against ``from_pretrained`` are measured by
``bench/bench_loading.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from gie_core.weights.loading import OnDemandLMHead, load_connector, load_gie_checkpoint
from gie_core.engine.components import module_bytes as resident_bytes
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
        for workers in (0, 2):  # mapped lazily, or fetched ahead by reader threads
            got = [k for k, _ in reader.iter_loaded(reversed(keys), torch.float32, "cpu", workers=workers,
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
