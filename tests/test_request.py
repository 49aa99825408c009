"""The request is the run: one resolver at every face, one carrier down to the step loop, and
a package whose modules import each other in one direction only."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gie_core.engine import sampler
from gie_core.engine.request import EditRequest, resolve_edit

REPO = Path(__file__).resolve().parents[1]
SPELLED_OUT = {"width", "height", "steps", "guidance", "seed", "batch_size", "true_cfg", "reference_method",
               "cfg_batch", "acceleration", "cache", "attention", "compile", "checked"}


# ---------------------------------------------------------------------------------------------
# One carrier
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prepare", "sample"])
def test_prepare_and_sample_take_the_request_whole_and_nothing_spelled_out(name):
    params = inspect.signature(getattr(sampler, name)).parameters
    assert list(params)[:4] == ["models", "positive", "references", "request"]
    assert params["request"].annotation in (EditRequest, "EditRequest")
    fields = {f.name for f in dataclasses.fields(EditRequest)}
    assert not (set(params) & (fields | SPELLED_OUT)), f"{name} spells out run values"
    # what travels beside the request: tensors, the device and the callbacks
    assert set(params) - {"models", "positive", "references", "request"} <= {
        "negative", "device", "noise", "reference_latents", "output", "progress", "interrupt", "preview"}


def test_the_step_loop_reads_the_request_and_the_twins_are_gone():
    assert "acceleration" not in inspect.signature(sampler.denoise).parameters
    assert "request" in {f.name for f in dataclasses.fields(sampler.Prepared)}
    for gone in ("check_sampling", "sample_request"):
        assert not hasattr(sampler, gone)
        users = [str(p.relative_to(REPO)) for root in ("gie_core", "nodes", "bench")
                 for p in (REPO / root).rglob("*.py") if gone in p.read_text()]
        assert users == [], f"{gone} is still used"


def test_a_spelled_out_call_is_refused_with_a_pointer_to_the_resolver():
    with pytest.raises(TypeError, match="request must be an EditRequest from gie_core.engine.request.resolve_edit"):
        sampler.prepare(None, None, None, {"width": 64, "height": 64})


def test_reference_methods_are_one_table():
    from gie_core import constants
    from nodes import sampling as node

    assert sampler.REFERENCE_METHODS is constants.REFERENCE_METHODS
    assert not hasattr(node, "REFERENCE_METHODS") or node.REFERENCE_METHODS is constants.REFERENCE_METHODS
    def defines(path):
        for n in ast.walk(ast.parse(path.read_text())):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
            if any(getattr(t, "id", None) == "REFERENCE_METHODS" for t in targets):
                return True
        return False

    definitions = [str(p.relative_to(REPO)) for root in ("gie_core", "nodes") for p in (REPO / root).rglob("*.py")
                   if defines(p)]
    assert definitions == ["gie_core/constants.py"]
    with pytest.raises(ValueError, match="reference method is 'stack' but must be one of index, offset"):
        resolve_edit(image_width=64, image_height=64, reference_method="stack")


# ---------------------------------------------------------------------------------------------
# No import circle
# ---------------------------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    mods = {}
    for root in ("gie_core", "nodes"):
        for p in (REPO / root).rglob("*.py"):
            parts = p.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside a function (``from x import
    name`` counts as importing ``x.name`` when that is a module, else ``x``). Importing a
    submodule also runs its package's ``__init__`` first; that is not an edge (a package that
    imports its own submodules makes no circle)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # ``from pkg import mod`` imports the module; ``from mod import name`` the module itself
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != m:
                    graph[m].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_finds_a_circle_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "gie_core.engine.request" in graph["gie_core.engine.sampler"]  # the graph sees real imports
    assert "gie_core.checks" in graph["gie_core.engine.acceleration"]
    assert cycles(graph) == []
    assert "gie_core.engine.request" not in graph["gie_core.engine.acceleration"]
    assert graph["gie_core.checks"] <= {"gie_core.constants"}  # the ground floor
    assert not any(m.startswith("nodes") for name in graph if name.startswith("gie_core") for m in graph[name])


def test_the_run_path_has_no_function_over_80_lines():
    """The modules a run passes through read in short steps (argument-parser builders and node
    input tables are lists, not steps)."""
    files = ["gie_core/checks.py", "gie_core/engine/request.py", "gie_core/engine/sampler.py",
             "gie_core/engine/acceleration.py", "gie_core/cli/edit.py", "nodes/sampling.py"]
    long = []
    for f in files:
        for node in ast.walk(ast.parse((REPO / f).read_text())):
            if isinstance(node, ast.FunctionDef) and node.name not in ("build_parser", "INPUT_TYPES"):
                if node.end_lineno - node.lineno + 1 > 80:
                    long.append(f"{f}:{node.name}")
    assert long == []


# ---------------------------------------------------------------------------------------------
# One resolver at every face
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def record_requests(monkeypatch):
    """The requests that reach the sampler from the pipeline (and so the CLI) and the node."""
    import gie_core.engine.pipeline as pipeline_module
    import nodes.sampling as node_module

    seen = []

    def recording(models, positive, references, request, **kw):
        seen.append(request)
        return sampler.sample(models, positive, references, request, **kw)

    monkeypatch.setattr(pipeline_module, "sample", recording)
    monkeypatch.setattr(node_module, "sample", recording)
    return seen


def test_the_node_the_cli_and_the_pipeline_make_the_same_request(tmp_path, kontext_dir, record_requests):
    from gie_core.cli.edit import main
    from gie_core.engine.components import KontextModel, PlacedModel, Placement
    from gie_core.engine.pipeline import EditPipeline
    from gie_core.imaging.images import load_image
    from gie_core.weights.loading import load_kontext_dir
    from nodes.sampling import GIEKontextSampler

    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.RandomState(1).rand(60, 90, 3) * 255).astype(np.uint8)).save(photo)
    # the same edit: 2 steps, seed 3, guidance 2.5, 64x48 out, the reference at its own size, magcache
    assert main([str(photo), "add a red hat", "-o", str(tmp_path / "out.png"), "--kontext", str(kontext_dir),
                 "--steps", "2", "--seed", "3", "--guidance", "2.5", "--size", "64x48", "--reference-size", "keep",
                 "--cache", "magcache", "--dtype", "fp32", "--device", "cpu", "--quiet"]) == 0
    pipe = EditPipeline.from_paths(kontext_dir=kontext_dir, mode="t5", dtype="fp32", device="cpu")
    pipe.edit(load_image(photo), "add a red hat", mode="t5", steps=2, seed=3, guidance=2.5, size=(64, 48),
              reference_resize="keep", cache="magcache")
    parts = load_kontext_dir(kontext_dir, dtype="fp32", parts=("transformer", "vae", "scheduler"))
    cfg = parts.transformer.config
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
                 {"pooled_output": torch.randn(1, cfg.pooled_projection_dim, generator=g)}]]
    image = torch.from_numpy(np.asarray(Image.open(photo).convert("RGB"), dtype=np.float32) / 255)[None]
    GIEKontextSampler().sample(KontextModel(parts.transformer, parts.scheduler, Placement("cpu")),
                               PlacedModel(parts.vae, Placement("cpu")), positive, image, seed=3, steps=2, guidance=2.5,
                               width=64, height=48, batch_size=1, reference_resize="keep", unload_after=False,
                               cache="magcache", cache_value=0.0)
    cli, library, node = record_requests
    assert cli == library
    assert (cli.width, cli.height, cli.steps, cli.seed, cli.guidance, str(cli.acceleration.cache)) == (
        64, 48, 2, 3, 2.5, "magcache:0.06")
    # the node has no fusion-mode input (its conditioning is fused upstream): every other value is the same
    assert dataclasses.replace(node, mode=cli.mode) == cli


def test_edit_options_are_the_resolvers_keywords(tmp_path, kontext_dir):
    from gie_core.engine.pipeline import EditPipeline

    pipe = EditPipeline.from_paths(kontext_dir=kontext_dir, mode="t5", dtype="fp32", device="cpu")
    image = Image.new("RGB", (64, 48), (10, 120, 200))
    with pytest.raises(TypeError, match="unknown edit option\\(s\\) stepz; the options are size and resolve_edit's"):
        pipe.edit(image, "add a red hat", mode="t5", stepz=2)
    with pytest.raises(TypeError, match="image_width"):
        pipe.edit(image, "add a red hat", mode="t5", image_width=64)
    with pytest.raises(TypeError, match="size=\\(width, height\\) or width/height, not both"):
        pipe.edit(image, "add a red hat", mode="t5", size=(64, 48), width=64)
    request = resolve_edit(image_width=64, image_height=48, mode="t5", steps=1, width=64, height=48)
    with pytest.raises(TypeError, match="either a request or options"):
        pipe.edit(image, "add a red hat", request=request, steps=2)
    # options and a request resolved from the same values are the same run
    a = pipe.edit(image, "add a red hat", mode="t5", steps=1, width=64, height=48)
    b = pipe.edit(image, "add a red hat", request=request)
    assert a.info["request"] == request and torch.equal(a.tensor, b.tensor)
