"""The README's offline training recipe runs as written: its commands are taken from the README
and executed in a scratch folder (with ``training/`` linked in), on the tiny models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HEADING = "### 6. Try the whole recipe offline, on tiny models"


def recipe_commands() -> str:
    """The bash block of the README's offline recipe section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert HEADING in text, "the README lost its offline training recipe"
    section = text.split(HEADING, 1)[1].split("\n#", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def test_readme_recipe_lists_every_step():
    commands = recipe_commands()
    for step in ("build_tiny_model_set('tiny/models')", "training/tiny/make_data.py tiny/data",
                 "--config training/stage1.yaml", "--config training/stage2.yaml", "gie-train export",
                 "gie-edit", "--connector tiny/exported/connector.safetensors",
                 "--lora tiny/exported/transformer_lora.safetensors"):
        assert step in commands, step


def test_readme_offline_training_recipe_runs(tmp_path, tiny_set):
    work = tmp_path / "work"
    work.mkdir()
    (work / "training").symlink_to(ROOT / "training")
    # the recipe's first command reuses a complete tiny set (its marker matches): copy the session's
    shutil.copytree(tiny_set.root, work / "tiny/models", symlinks=True)
    script = "set -euo pipefail\n" + recipe_commands()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

    tiny = work / "tiny"
    assert (tiny / "data/data.txt").is_file()
    for step in (10, 20):
        with Image.open(tiny / f"runs/stage1/validation/step-{step}/0.png") as im:
            assert im.size == (96, 64)
    assert (tiny / "runs/stage1/export/connector.safetensors").is_file()
    assert (tiny / "runs/stage2/checkpoints/checkpoint-10/trainer_state.json").is_file()
    info = json.loads((tiny / "exported/export_info.json").read_text())
    assert (info["stage"], info["trainable"], info["step"]) == (2, "lora", 10)
    assert set(info["files"]) == {"connector", "lora"}
    with Image.open(tiny / "edit.png") as im:
        assert im.size == (96, 64)
    assert "tiny/edit.png" in out.stdout
