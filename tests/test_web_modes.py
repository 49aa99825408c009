"""web/gie.js carries a copy of the fusion-mode table and drives the Fusion Connector's look from it.

No browser and no ComfyUI: the table literal is parsed with json and compared with
gie_core.engine.modes.table_for_web(); the rest of the file must not name a mode. Where node is on PATH,
the extension's pure functions are also run (with ComfyUI's ``app`` stubbed out).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gie_core.engine.modes import FUSION_MODES, table_for_web

REPO = Path(__file__).resolve().parents[1]
GIE_JS = REPO / "web" / "gie.js"
BEGIN = re.compile(r"^// BEGIN FUSION_MODE_TABLE\b.*$", re.M)
END = re.compile(r"^// END FUSION_MODE_TABLE\b.*$", re.M)
APP_IMPORT = 'import { app } from "../../scripts/app.js";'


def split_table_block(source: str) -> tuple[str, str, str]:
    """(before, block, after) around the marker comments; exactly one block."""
    begins, ends = list(BEGIN.finditer(source)), list(END.finditer(source))
    assert len(begins) == 1 and len(ends) == 1, "gie.js needs exactly one BEGIN/END FUSION_MODE_TABLE pair"
    b, e = begins[0], ends[0]
    assert b.end() < e.start(), "END FUSION_MODE_TABLE comes before BEGIN"
    return source[: b.start()], source[b.end(): e.start()], source[e.end():]


def table_literal(block: str) -> dict:
    m = re.fullmatch(r"\s*export const FUSION_MODE_TABLE\s*=\s*(\{.*\})\s*;\s*", block, re.S)
    assert m, "the block must hold only `export const FUSION_MODE_TABLE = {...};`"
    return json.loads(m.group(1))


def strip_comments(js: str) -> str:
    """Drop /* */ and // comments (gie.js has no '//' or '/*' inside strings outside comments)."""
    js = re.sub(r"/\*.*?\*/", "", js, flags=re.S)
    return re.sub(r"(^|[^:\\])//[^\n]*", r"\1", js)


def mode_names_outside_table(source: str) -> list[str]:
    """Mode names quoted anywhere (code or comments), or used as bare object keys, outside the block."""
    before, _, after = split_table_block(source)
    found = []
    for part in (before, after):
        for name in FUSION_MODES:
            q = re.escape(name)
            found += [m.group(0) for m in re.finditer(rf"([\"'`]){q}\1", part)]
            found += [m.group(0) for m in re.finditer(rf"(?<![\w+.$-]){q}(?![\w+])\s*:(?!:)", strip_comments(part))]
    return found


def test_web_table_equals_python_table():
    _, block, _ = split_table_block(GIE_JS.read_text())
    assert table_literal(block) == table_for_web()


def test_no_mode_names_outside_the_table():
    assert mode_names_outside_table(GIE_JS.read_text()) == []


def test_the_checks_catch_the_old_hard_coded_names():
    """The scanners above see what the extension used to carry (mode-keyed maps and quoted names)."""
    old = (
        '// BEGIN FUSION_MODE_TABLE x\nexport const FUSION_MODE_TABLE = {"vlm": {}};\n// END FUSION_MODE_TABLE\n'
        'const USES_QWEN = { "vlm+t5": true, "t5": false };\n'
        "const TEXT_LABEL = { vlm: 'a', metaquery: 'b' };\n"
        "if (mode === 'vlm+t5+type') {}\n"
    )
    assert sorted(mode_names_outside_table(old)) == sorted(['"vlm+t5"', '"t5"', "vlm:", "metaquery:", "'vlm+t5+type'"])
    assert table_literal(split_table_block(old)[1]) == {"vlm": {}}


NODE_SCRIPT = r"""
const m = await import(process.argv[2]);
const registered = globalThis.__gieRegistered;
const modes = Object.keys(m.FUSION_MODE_TABLE);
const look = Object.fromEntries(modes.map((k) => [k, m.fusionInputLook(k)]));
look["?unknown"] = m.fusionInputLook("no such mode");
look["?undefined"] = m.fusionInputLook(undefined);
look["?proto"] = m.fusionInputLook("constructor");
console.log(JSON.stringify({ table: m.FUSION_MODE_TABLE, look, registered: registered.map((e) => e.name) }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_extension_functions_under_node(tmp_path):
    source = GIE_JS.read_text()
    assert source.count(APP_IMPORT) == 1, "gie.js imports ComfyUI's app once, as the stub below expects"
    stub = "const app = { registerExtension: (e) => (globalThis.__gieRegistered ??= []).push(e) };"
    module = tmp_path / "gie.mjs"
    module.write_text(source.replace(APP_IMPORT, stub))
    script = tmp_path / "run.mjs"
    script.write_text(NODE_SCRIPT)
    out = subprocess.run(["node", str(script), module.as_uri()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)

    assert got["registered"] == ["gpt_image_edit.ui"]
    assert got["table"] == table_for_web()
    for name, row in table_for_web().items():
        clip_empty_only = row["pooled_from"] == "empty" and not row["needs_t5"]
        assert got["look"][name] == {
            "usesQwen": row["needs_qwen"],
            "textLabel": "text_features (CLIP '' only)" if clip_empty_only else None,
        }, name
    # what the browser test (tests/test_comfy_server.py) expects of the shipped modes
    assert got["look"]["t5"]["usesQwen"] is False
    assert got["look"]["vlm"]["textLabel"] == "text_features (CLIP '' only)"
    assert got["look"]["vlm+t5"] == {"usesQwen": True, "textLabel": None}
    for odd in ("?unknown", "?undefined", "?proto"):
        assert got["look"][odd] == {"usesQwen": True, "textLabel": None}, odd
