"""Faster sampling: step caches, attention backends and compile, in the library, the CLI and the node.

Speed itself is measured by ``bench/bench_cache.py``; here each choice's behaviour: it runs, it
skips work, it stays within its documented bound of the uncached result, it leaves nothing
behind, and what cannot run here falls back with a clear message.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gie_core.engine.acceleration import (
    ATTENTION_TABLE,
    CACHE_TABLE,
    DEFAULT_ATTENTION,
    Acceleration,
    StepCache,
    cache_choice,
    parse_cache,
    resolve_acceleration,
)
from gie_core.engine.conditioning import Conditioning
from gie_core.weights.loading import load_kontext_dir
from gie_core.engine.request import resolve_edit
from gie_core.engine.sampler import KontextModels, sample

STEPS = 12


@pytest.fixture(scope="module")
def kontext(kontext_dir):
    c = load_kontext_dir(kontext_dir, dtype="fp32", parts=("transformer", "vae", "scheduler"))
    return KontextModels(c.transformer, c.vae, c.scheduler)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 8, 32, generator=g), torch.randn(1, 64, generator=g))
    neg = Conditioning(torch.randn(1, 8, 32, generator=g), torch.randn(1, 64, generator=g))
    ref = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    return cond, neg, ref


class AttentionCalls:
    """Counts the computations of the last block's attention (skipped work is not computed)."""

    def __init__(self, transformer):
        self.n = 0
        self.handle = transformer.single_transformer_blocks[-1].attn.to_q.register_forward_hook(self._count)

    def _count(self, *_):
        self.n += 1

    def __enter__(self):
        self.n = 0
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def request(**kw):
    """A 64x64 run of STEPS steps, seed 1, with resolve_edit's other ``kw``."""
    return resolve_edit(image_width=64, image_height=64, width=64, height=64, steps=STEPS, seed=1, **kw)


def run(kontext, inputs, acceleration=None):
    cond, neg, ref = inputs
    run_request = request() if acceleration is None else dataclasses.replace(request(), acceleration=acceleration)
    return sample(kontext, cond, ref, run_request)


def psnr(a, b) -> float:
    mse = ((a - b) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@pytest.mark.parametrize("row", CACHE_TABLE, ids=[r.name for r in CACHE_TABLE])
def test_each_cache_method_skips_work_and_stays_within_its_bound(kontext, inputs, row):
    base = run(kontext, inputs)
    for value in (row.default, row.high):  # its default and its most aggressive setting
        with AttentionCalls(kontext.transformer) as calls:
            out = run(kontext, inputs, resolve_acceleration(f"{row.name}:{value}"))
        assert psnr(out, base) >= row.min_psnr_db, f"{row.name}:{value} is {psnr(out, base):.1f} dB from uncached"
        if value == row.high:
            assert calls.n < STEPS, f"{row.name}:{value} computed every step ({calls.n}/{STEPS})"
    # nothing is left behind: the next uncached run is the uncached image, bit for bit
    assert torch.equal(run(kontext, inputs), base)
    assert not kontext.transformer.is_cache_enabled


def test_first_block_cache_at_threshold_zero_is_the_uncached_run(kontext, inputs):
    base = run(kontext, inputs)
    with AttentionCalls(kontext.transformer) as calls:
        out = run(kontext, inputs, resolve_acceleration("fbcache:0"))
    assert calls.n == STEPS and torch.equal(out, base)


def test_cache_state_does_not_leak_between_runs(kontext, inputs):
    """The same cache twice gives the same image (state is reset per run), also after another
    step count (the cache is rebuilt for it)."""
    acc = resolve_acceleration("magcache")
    first = run(kontext, inputs, acc)
    assert torch.equal(run(kontext, inputs, acc), first)
    cond, _, ref = inputs
    sample(kontext, cond, ref, dataclasses.replace(request(), steps=5, acceleration=acc))
    assert torch.equal(run(kontext, inputs, acc), first)


def test_cache_with_true_cfg_keeps_cond_and_uncond_apart(kontext, inputs):
    cond, neg, ref = inputs
    base = sample(kontext, cond, ref, request(true_cfg=3.0, cfg_batch=False), negative=neg)
    for cfg_batch in (False, True):
        out = sample(kontext, cond, ref, request(true_cfg=3.0, cfg_batch=cfg_batch, cache="taylorseer"), negative=neg)
        assert psnr(out, base) >= 30


def test_a_cache_enabled_by_the_owner_is_left_alone(kontext, inputs):
    from diffusers.hooks import FirstBlockCacheConfig

    t = kontext.transformer
    t.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    try:
        with pytest.raises(ValueError, match="already has a step cache"):
            run(kontext, inputs, resolve_acceleration("magcache"))
        with t.cache_context("cond"):  # the owner's own loop still works
            pass
    finally:
        t.disable_cache()


@pytest.mark.parametrize("spec, message", [
    ("warpcache", "cache method 'warpcache' is unknown"),
    ("magcache:fast", "threshold 'fast' is not a number"),
    ("magcache:2", "magcache threshold is 2 but must be in 0..1"),
    ("taylorseer:2.5", "taylorseer interval is 2.5 but must be a whole number"),
    ("fastercache:1", "fastercache interval is 1 but must be in 2..50"),
    ("magcache:nan", "must be a finite number"),
])
def test_bad_cache_names_and_values_are_refused_by_the_resolver(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_edit(image_width=64, image_height=64, cache=spec)


def test_cache_specs_parse_to_one_choice():
    assert parse_cache(None) is None and parse_cache("none") is None and parse_cache("") is None
    assert parse_cache("MagCache") == StepCache("magcache", 0.06)
    assert str(parse_cache("taylorseer:3")) == "taylorseer:3"
    assert cache_choice("none", 0.3) is None
    assert cache_choice("magcache", 0) == parse_cache("magcache")  # 0 = the default (a node's widget)
    assert cache_choice("fbcache", 0.2) == StepCache("fbcache", 0.2)
    with pytest.raises(ValueError, match="attention backend 'fast' is unknown"):
        resolve_acceleration(attention="fast")


def test_unavailable_attention_backend_falls_back_to_sdpa_with_a_clear_message(kontext, inputs, caplog):
    missing = next(a.name for a in ATTENTION_TABLE if a.needs_cuda)
    acc = resolve_acceleration(attention=missing)
    with caplog.at_level(logging.WARNING, logger="gie_core.engine.acceleration"):
        out = run(kontext, inputs, acc)
    assert f"attention backend '{missing}' is not available" in caplog.text and "using sdpa" in caplog.text
    assert torch.equal(out, run(kontext, inputs))  # the default ran
    eff = acc.effective("cpu", log=False)
    assert eff.attention == DEFAULT_ATTENTION and len(eff.notes) == 1


def test_compile_without_a_compiler_falls_back_with_a_clear_message(kontext, inputs, monkeypatch, caplog):
    import gie_core.engine.acceleration as acceleration

    monkeypatch.setattr(acceleration.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="gie_core.engine.acceleration"):
        out = run(kontext, inputs, resolve_acceleration(compile=True))
    assert "compile is not available" in caplog.text and "C++ compiler" in caplog.text
    assert torch.equal(out, run(kontext, inputs))
    assert not getattr(kontext.transformer, "_gie_compiled_blocks", False)


def test_unavailable_cache_method_falls_back_to_no_cache(monkeypatch):
    import gie_core.engine.acceleration as acceleration

    monkeypatch.setattr(acceleration, "cache_unavailable", lambda name: "not in this diffusers")
    eff = Acceleration(parse_cache("magcache")).effective("cpu", log=False)
    assert eff.cache is None and "sampling without a cache" in eff.notes[0]


# --- the faces ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "photo.png"
    Image.fromarray((np.random.RandomState(2).rand(48, 64, 3) * 255).astype(np.uint8)).save(path)
    return path


CLI = ["--steps", "6", "--size", "64x48", "--reference-size", "keep", "--dtype", "fp32", "--device", "cpu", "--quiet"]


def test_cli_cache_and_fallback_notes(tmp_path, photo, kontext_dir, capsys):
    from gie_core.cli.edit import main

    plain, cached = tmp_path / "plain.png", tmp_path / "cached.png"
    args = [str(photo), "add a red hat", "--kontext", str(kontext_dir), *CLI]
    assert main([*args, "-o", str(plain)]) == 0
    assert main([*args, "-o", str(cached), "--cache", "magcache:0.5", "--attention", "sage"]) == 0
    err = capsys.readouterr().err
    assert "gie-edit: note: attention backend 'sage' is not available" in err and err.count("'sage'") == 1
    a, b = (np.asarray(Image.open(p), dtype=np.float64) / 255 for p in (plain, cached))
    assert 10 * math.log10(1 / max(((a - b) ** 2).mean(), 1e-12)) >= 30


@pytest.mark.parametrize("flag, value, message", [
    ("--cache", "warpcache", "cache method 'warpcache' is unknown"),
    ("--cache", "magcache:7", "magcache threshold is 7 but must be in 0..1"),
    ("--cache", "taylorseer:0", "taylorseer interval is 0 but must be in 1..50"),
])
def test_cli_bad_cache_exits_2_before_loading(tmp_path, photo, kontext_dir, monkeypatch, capsys, flag, value, message):
    from gie_core.cli.edit import main
    from gie_core.engine.pipeline import EditPipeline

    def no_load(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(EditPipeline, "from_paths", no_load)
    out = tmp_path / "out.png"
    assert main([str(photo), "add a red hat", "-o", str(out), "--kontext", str(kontext_dir), *CLI, flag, value]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_sampler_node_takes_cache_attention_and_compile(kontext_dir, inputs):
    from nodes.sampling import GIEKontextSampler
    from gie_core.engine.components import KontextModel, PlacedModel, Placement

    spec = GIEKontextSampler.INPUT_TYPES()["optional"]
    assert spec["cache"][1]["default"] == "none" and spec["attention"][1]["default"] == DEFAULT_ATTENTION
    assert spec["cache"][0][1:] == [r.name for r in CACHE_TABLE]
    c = load_kontext_dir(kontext_dir, dtype="fp32", parts=("transformer", "vae", "scheduler"))
    model = KontextModel(c.transformer, c.scheduler, Placement("cpu"))
    vae = PlacedModel(c.vae, Placement("cpu"))
    cond, _, _ = inputs
    positive = [[cond.context, {"pooled_output": cond.pooled}]]
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    node = GIEKontextSampler()
    args = dict(kontext_model=model, vae=vae, positive=positive, image=image, seed=1, steps=8, guidance=3.5, width=64,
                height=64, batch_size=1, reference_resize="keep", unload_after=False)
    (base,) = node.sample(**args)
    (cached,) = node.sample(**args, cache="taylorseer", cache_value=0.0, attention="flash", compile=False)
    assert psnr(cached, base) >= 30
    with pytest.raises(ValueError, match="magcache threshold is 5 but must be in 0..1"):
        node.sample(**args, cache="magcache", cache_value=5.0)
