"""One place for each rule: the fusion-mode table drives every face, the sampler runs in parts
with a schedule that owns ``mu`` (shared with the trainer's loss), and no face re-states a rule."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gie_core.engine import modes
from gie_core.engine.connector import Connector, QwenFeatures, TextFeatures, fuse
from gie_core.weights.loading import load_kontext_dir
from gie_core.engine.modes import FUSION_MODE_TABLE, FusionMode, fusion_mode
from gie_core.engine.request import resolve_edit
from gie_core.engine.sampler import KontextModels, decode, denoise, prepare, sample
from gie_core.engine.schedule import Schedule, shift_mu, shift_sigmas

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The fusion-mode table
# ---------------------------------------------------------------------------------------------


def features(batch=1, l_vlm=5, l_t5=7, h=12, d=16, p=8, queries=0):
    g = torch.Generator().manual_seed(0)
    vlm = QwenFeatures(torch.randn(batch, l_vlm + queries, h, generator=g), queries)
    text = TextFeatures(torch.randn(batch, l_t5, d, generator=g), torch.randn(batch, p, generator=g),
                        torch.randn(1, p, generator=g))
    return vlm, text


@pytest.mark.parametrize("name", list(FUSION_MODE_TABLE))
def test_fuse_builds_what_the_table_row_says(name):
    spec = fusion_mode(name)
    conn = Connector.for_mode(name, 12, 16, num_queries=3)
    vlm, text = features(queries=3 if spec.queries else 0)
    cond = fuse(name, conn, vlm if spec.needs_qwen else None, text)
    n_vlm = (3 if spec.queries else 5) if spec.needs_qwen else 0
    assert cond.context.shape == (1, n_vlm + (7 if spec.needs_t5 else 0), 16)
    expected_pooled = text.pooled if spec.pooled_from == "instruction" else text.pooled_empty
    assert torch.equal(cond.pooled, expected_pooled)
    if spec.needs_t5:  # T5 tokens come last (plus the type embedding's T5 row)
        t5 = text.t5 + (conn.type_embedding[1] if spec.type_embedding else 0)
        assert torch.allclose(cond.context[:, n_vlm:], t5)
    assert name in conn.modes


def test_a_new_mode_is_one_table_row(monkeypatch):
    """A mode that is only a new combination of existing needs works in fuse and the connector
    with no other change (here: VLM + T5 tokens with the CLIP('') pooled vector)."""
    row = FusionMode("vlm+t5-empty", True, True, "empty", False, False, True, "test mode")
    monkeypatch.setitem(FUSION_MODE_TABLE, row.name, row)
    conn = Connector.for_mode(row.name, 12, 16)
    assert row.name in conn.modes
    vlm, text = features()
    cond = fuse(row.name, conn, vlm, text)
    assert cond.context.shape == (1, 12, 16) and torch.equal(cond.pooled, text.pooled_empty)
    assert modes.modes_with() == tuple(n for n, m in FUSION_MODE_TABLE.items() if not (m.queries or m.type_embedding))


def test_table_rules():
    assert modes.FUSION_MODES == ("vlm", "t5", "vlm+t5", "vlm+t5+type", "metaquery")
    assert modes.DEFAULT_FUSION_MODE == "vlm+t5" and modes.STOCK_FUSION_MODE == "t5"
    assert "t5" not in modes.TRAINABLE_MODES
    with pytest.raises(ValueError, match="fusion mode 'x' is unknown; expected one of vlm, t5"):
        fusion_mode("x")
    with pytest.raises(ValueError, match="pooled_from"):
        FusionMode("bad", True, True, "nothing", False, False, True, "")


MODE_NAMES = set(FUSION_MODE_TABLE)


def _mode_comparisons(path: Path) -> list[str]:
    """Places that compare a value with a fusion-mode name (``mode == "vlm"``, ``in ("vlm", ...)``)."""
    found = []

    def names_a_mode(n) -> bool:
        text = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else ""
        return "mode" in text.lower()

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and any(names_a_mode(n) for n in ast.walk(node)):
            consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in MODE_NAMES]
            if consts:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_face_compares_mode_names():
    """Every face asks the table (needs_qwen, needs_t5, pooled_from, queries), never a name."""
    files = [p for d in ("gie_core", "nodes") for p in (REPO / d).rglob("*.py") if p.name != "modes.py"]
    offenders = [hit for p in files for hit in _mode_comparisons(p)]
    assert offenders == []


# ---------------------------------------------------------------------------------------------
# The schedule and the sampler in parts
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kontext(kontext_dir):
    comps = load_kontext_dir(kontext_dir, dtype="fp32", parts=("transformer", "vae", "scheduler"))
    return KontextModels(comps.transformer, comps.vae, comps.scheduler)


@pytest.mark.parametrize("tokens", [16, 1024, 4096])
def test_schedule_mu_is_the_trainers_shift(kontext, tokens):
    """Sampling and training shift sigmas with the same code: the schedule's sigmas are the
    trainer's shift applied to the reference's linear sigmas (and diffusers' own)."""
    sched = Schedule.create(kontext.scheduler, 28, tokens)
    assert sched.mu == pytest.approx(shift_mu(tokens, kontext.scheduler.config))
    expected = shift_sigmas(torch.from_numpy(np.linspace(1.0, 1 / 28, 28)), sched.mu)
    assert torch.allclose(sched.scheduler.sigmas[:-1].double(), expected, atol=1e-6)
    assert torch.allclose(sched.timesteps.double(), expected * 1000, atol=1e-3)
    from gie_core.train.loss import sample_sigmas

    g = torch.Generator().manual_seed(0)
    u = torch.sigmoid(torch.randn((4,), generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(sample_sigmas(4, tokens, g, scheduler_config=kontext.scheduler.config), shift_sigmas(u, sched.mu))


def test_sample_is_prepare_denoise_decode(kontext):
    from gie_core.engine.conditioning import Conditioning

    cfg = kontext.transformer.config
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(1, 6, cfg.joint_attention_dim, generator=g),
                        torch.randn(1, cfg.pooled_projection_dim, generator=g))
    ref = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    request = resolve_edit(image_width=48, image_height=32, width=48, height=32, steps=2, seed=5)
    whole = sample(kontext, cond, ref, request)
    run = prepare(kontext, cond, ref, request)
    assert run.schedule.steps == 2 and run.n_target == (32 // 16) * (48 // 16)
    latents = denoise(kontext.transformer, run)
    assert torch.equal(decode(kontext.vae, latents), whole)


def test_sample_checks_values_when_called_directly(kontext):
    from gie_core.engine.conditioning import Conditioning

    cfg = kontext.transformer.config
    cond = Conditioning(torch.zeros(1, 4, cfg.joint_attention_dim), torch.zeros(1, cfg.pooled_projection_dim))
    size = dict(image_width=32, image_height=32, width=32, height=32)
    with pytest.raises(ValueError, match="guidance is nan"):
        sample(kontext, cond, None, resolve_edit(**size, steps=1, guidance=float("nan")))
    with pytest.raises(ValueError, match="seed is -1"):
        sample(kontext, cond, None, resolve_edit(**size, steps=1, seed=-1))


# ---------------------------------------------------------------------------------------------
# constants.py is true
# ---------------------------------------------------------------------------------------------


def test_faces_take_ranges_and_defaults_from_constants():
    """The sampler node's widgets and gie-edit's defaults are the constants."""
    from gie_core import constants as c
    from gie_core.cli.edit import build_parser
    from nodes.sampling import GIEKontextSampler

    spec = GIEKontextSampler.INPUT_TYPES()
    req, opt = spec["required"], spec["optional"]
    assert (req["steps"][1]["min"], req["steps"][1]["max"], req["steps"][1]["default"]) == (*c.STEPS_RANGE, c.DEFAULT_STEPS)
    assert (req["guidance"][1]["min"], req["guidance"][1]["max"]) == c.GUIDANCE_RANGE
    assert (req["seed"][1]["min"], req["seed"][1]["max"]) == c.SEED_RANGE
    assert (req["batch_size"][1]["min"], req["batch_size"][1]["max"]) == c.BATCH_RANGE
    assert (opt["true_cfg"][1]["min"], opt["true_cfg"][1]["max"]) == c.TRUE_CFG_RANGE
    assert tuple(opt["reference_resample"][0]) == c.REFERENCE_RESAMPLE_MODES
    args = build_parser().parse_args(["-o", "x.png"])
    assert (args.steps, args.guidance, args.seed, args.true_cfg) == (
        c.DEFAULT_STEPS, c.DEFAULT_GUIDANCE, c.DEFAULT_SEED, c.DEFAULT_TRUE_CFG)


def test_one_atomic_write_helper():
    """Files are written through gie_core.files only: no mkstemp / os.replace of files elsewhere."""
    offenders = []
    for p in (REPO / "gie_core").rglob("*.py"):
        if p.name == "files.py" or "testing" in p.parts:
            continue
        text = p.read_text()
        for m in re.finditer(r"mkstemp\(", text):
            offenders.append(f"{p.relative_to(REPO)}:{text[:m.start()].count(chr(10)) + 1}")
    assert offenders == []


def test_edit_and_rewrite_commands_do_not_import_each_other():
    for name, other in (("edit", "rewrite"), ("rewrite", "edit")):
        tree = ast.parse((REPO / "gie_core" / "cli" / f"{name}.py").read_text())
        siblings = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        absolute = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert other not in siblings and f"gie_core.cli.{other}" not in absolute, name
        assert "common" in siblings or "gie_core.cli.common" in absolute, name


def test_previews_get_the_predicted_clean_latents(kontext):
    """Each step hands ComfyUI's previewer x0 = x_t - sigma * v; after the last step that is the result."""
    from gie_core.engine.conditioning import Conditioning

    cfg = kontext.transformer.config
    cond = Conditioning(torch.randn(1, 4, cfg.joint_attention_dim), torch.randn(1, cfg.pooled_projection_dim))
    seen = []
    request = resolve_edit(image_width=32, image_height=32, width=32, height=32, steps=3)
    latents = sample(kontext, cond, None, request, output="latent",
                     preview=lambda done, total, x0: seen.append((done, total, x0)))
    assert [(d, t) for d, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert seen[-1][2].shape == latents.shape and torch.allclose(seen[-1][2], latents.float(), atol=1e-5)
