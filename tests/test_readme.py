"""The README's commands are what CI runs: set-up + main job first, then the test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[ln.strip() for ln in b.splitlines() if ln.strip() and not ln.strip().startswith("#")] for b in blocks]


def test_ci_runs_the_readme_quick_start_exactly():
    readme = _bash_blocks((ROOT / "README.md").read_text())
    setup, tests = readme[0], readme[1]
    ci = [
        ln.strip()
        for ln in (ROOT / ".ci" / "run").read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#") and not ln.startswith(("set ", "cd "))
    ]
    assert ci == setup + tests
    assert tests == ["python -m pytest -q"]
    assert any(ln.startswith("gie-edit") for ln in setup)  # the main job


def _comfy_run_examples(text: str) -> list[list[str]]:
    """Each ``gie-comfy-run`` command of the README's bash blocks, as its argument list."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("gie-comfy-run "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_readme_gie_comfy_run_examples_name_nodes_of_their_workflow():
    """Every ``--set "NODE.INPUT=VALUE"`` and ``--image NODE=PATH`` of a README example names a node
    and input of the workflow it runs, exactly as gie-comfy-run resolves them (a renamed title fails)."""
    import json

    import nodes
    from gie_core.cli.comfy_run import apply_set, find_node

    def declared(class_type):
        cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
        types = cls.INPUT_TYPES() if cls else {}
        return set(types.get("required", {})) | set(types.get("optional", {}))

    examples = _comfy_run_examples((ROOT / "README.md").read_text())
    assert examples, "the README shows no gie-comfy-run command"
    checked = 0
    for args in examples:
        prompt = json.loads((ROOT / args[0]).read_text())
        for flag, value in zip(args, args[1:]):
            if flag == "--set":
                apply_set(prompt, value, declared)  # raises RunError for an unknown node or input
                checked += 1
            elif flag == "--image" and "=" in value:
                find_node(prompt, value.split("=", 1)[0])
    assert checked
