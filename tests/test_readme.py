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
