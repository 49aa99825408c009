"""The browser extension reads every rule from the server: GET /gie/rules and GET /gie/pad_plan.

No browser and no ComfyUI: the routes' functions are compared with gie_core (the pad plan is
``plan_padding``'s, an error is the Pad To Ratio node's own message), their ComfyUI glue is
registered on a stand-in server, ``web/gie.js`` is scanned for copies of rules, and, where ``node``
is on PATH, the extension itself runs against a small HTTP server answering with the same
functions (ComfyUI's ``app`` and ``api`` stubbed: ``api.fetchApi`` prefixes ``/api`` as ComfyUI's does).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import shutil
import subprocess
import threading
import types
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch

from gie_core.engine import web_rules
from gie_core.constants import PREFERRED_KONTEXT_RESOLUTIONS
from gie_core.engine.modes import FUSION_MODES, table_for_web
from gie_core.imaging.ratio import PLACEMENTS, RATIO_SETS, plan_padding
from nodes import comfy, web_api
from nodes.ratio import GIEPadToRatio

REPO = Path(__file__).resolve().parents[1]
GIE_JS = REPO / "web" / "gie.js"
APP_IMPORT = 'import { app } from "../../scripts/app.js";'
API_IMPORT = 'import { api } from "../../scripts/api.js";'
BAD_CUSTOM = ["1:1, x", "3:0", "a:b", "4-3", " , ;"]


def pad_cases(n: int = 120) -> list[tuple[int, int, str, str, str]]:
    """(width, height, ratios, custom_ratios, placement): both named sets, custom lists, blank custom."""
    rng = np.random.default_rng(0)
    customs = ["", "  ", "16:9, 9:16, 1:1", "4:3;3:4", "1024x768, 7:5", "21:9"]
    cases = [(int(w), int(h), ("default", "kontext")[i % 2], customs[i % len(customs)], PLACEMENTS[i % len(PLACEMENTS)])
             for i, (w, h) in enumerate(rng.integers(1, 3000, (n, 2)))]
    return cases + [(1, 1, "default", "", "center"), (300, 300, "default", "3:2, 2:3", "center"),
                    (1000, 667, "kontext", "", "right"), (80, 48, "default", "", "center")]


def query(w, h, ratios, custom, placement) -> dict[str, str]:
    """What the extension sends: every value a string, as in a query string."""
    return {"width": str(w), "height": str(h), "ratios": ratios, "custom_ratios": custom, "placement": placement}


def node_error(custom: str) -> str:
    """The message Pad To Ratio itself raises for a bad custom_ratios."""
    with pytest.raises(ValueError) as exc:
        GIEPadToRatio().pad(torch.rand(1, 48, 80, 3), "default", "white", "center", custom_ratios=custom)
    return str(exc.value)


# ---------------------------------------------------------------------------------------------
# The routes' functions are gie_core's
# ---------------------------------------------------------------------------------------------


def test_rules_are_gie_cores_tables():
    got = json.loads(json.dumps(web_rules.ROUTES["/gie/rules"]({})[1]))  # as it travels
    assert got == {
        "fusion_modes": table_for_web(),
        "ratio_sets": {name: [list(r) for r in ratios] for name, ratios in RATIO_SETS.items()},
        "placements": list(PLACEMENTS),
    }
    assert list(got["fusion_modes"]) == list(FUSION_MODES)


def test_pad_plan_is_plan_padding():
    for w, h, ratios, custom, placement in pad_cases():
        status, body = web_rules.ROUTES["/gie/pad_plan"](query(w, h, ratios, custom, placement))
        spec = custom if custom.strip() else ratios  # a blank custom list means the named set
        assert (status, body) == (200, plan_padding(w, h, spec, placement).to_dict()), (w, h, ratios, custom, placement)
    # a missing widget value is the node's default
    assert web_rules.pad_plan_answer({"width": "80", "height": "48"}) == (200, plan_padding(80, 48).to_dict())


def test_pad_to_ratio_node_pads_with_the_served_plan():
    padded, record, mask = GIEPadToRatio().pad(torch.rand(2, 48, 80, 3), "kontext", "black", "top", custom_ratios="")
    _, body = web_rules.pad_plan_answer(query(80, 48, "kontext", "", "top"))
    assert record.to_dict() == body
    assert padded.shape == (2, body["padded_height"], body["padded_width"], 3) and mask.shape == padded.shape[:3]


@pytest.mark.parametrize("custom", BAD_CUSTOM)
def test_pad_plan_error_is_the_nodes_message(custom):
    status, body = web_rules.pad_plan_answer(query(80, 48, "default", custom, "center"))
    assert status == 400 and body == {"error": node_error(custom)}


@pytest.mark.parametrize("field,value", [("width", "0"), ("height", "-3"), ("width", "wide"), ("height", None)])
def test_pad_plan_refuses_a_bad_size_naming_it(field, value):
    q = query(80, 48, "default", "", "center")
    if value is None:
        del q[field]
    else:
        q[field] = value
    status, body = web_rules.pad_plan_answer(q)
    assert status == 400 and body["error"].startswith(f"{field} ") and "positive integer" in body["error"]


# ---------------------------------------------------------------------------------------------
# The ComfyUI glue
# ---------------------------------------------------------------------------------------------


class StandInRoutes:
    """What the pack uses of aiohttp's RouteTableDef: ``routes.get(path)(handler)``."""

    def __init__(self):
        self.added: dict[str, object] = {}

    def get(self, path):
        def add(handler):
            self.added[path] = handler
            return handler
        return add


@pytest.fixture
def stand_in_server(monkeypatch):
    """ComfyUI's ``server`` and ``aiohttp.web`` as far as nodes/web_api.py touches them."""
    routes = StandInRoutes()
    server = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=types.SimpleNamespace(routes=routes)))
    web = types.SimpleNamespace(json_response=lambda body, status=200: {"status": status, "body": body})
    monkeypatch.setattr(comfy, "_modules", {"server": server, "aiohttp.web": web})
    return routes


def test_routes_are_registered_on_comfys_server(stand_in_server):
    assert web_api.register() is True
    assert sorted(stand_in_server.added) == ["/gie/pad_plan", "/gie/rules"]

    def get(path, q):
        request = types.SimpleNamespace(rel_url=types.SimpleNamespace(query=q))
        return asyncio.run(stand_in_server.added[path](request))

    assert get("/gie/rules", {}) == {"status": 200, "body": web_rules.rules()}
    assert get("/gie/pad_plan", query(80, 48, "default", "", "top")) == {
        "status": 200, "body": plan_padding(80, 48, "default", "top").to_dict()}
    assert get("/gie/pad_plan", query(80, 48, "default", "1:1, x", "top")) == {
        "status": 400, "body": {"error": node_error("1:1, x")}}


def test_no_routes_outside_comfy(monkeypatch):
    monkeypatch.setattr(comfy, "_modules", {"server": None, "aiohttp.web": None})
    assert web_api.register() is False


# ---------------------------------------------------------------------------------------------
# web/gie.js holds no copy of a rule
# ---------------------------------------------------------------------------------------------


def strip_comments(js: str) -> str:
    """Drop /* */ and // comments (gie.js has no '//' or '/*' inside strings outside comments)."""
    js = re.sub(r"/\*.*?\*/", "", js, flags=re.S)
    return re.sub(r"(^|[^:\\])//[^\n]*", r"\1", js)


KONTEXT_NUMBERS = sorted({str(v) for wh in PREFERRED_KONTEXT_RESOLUTIONS for v in wh} - {"1024"})
COPY_MARKERS = ("FUSION_MODE_TABLE", "DEFAULT_RATIOS", "PREFERRED_KONTEXT_RESOLUTIONS", "RATIO_SETS", "parseRatios",
                "nearestRatio", "padRecord", "gcd", "Math.ceil", "BigInt", "placement ===")


def copies_of_rules(source: str) -> list[str]:
    """Traces of a copied rule: table/constant names, ratio maths, Kontext resolutions, mode names."""
    found = [m for m in COPY_MARKERS if m in source]
    found += re.findall(r"kontext", source, flags=re.I)  # a ratio set named or described
    code = strip_comments(source)
    found += [n for n in KONTEXT_NUMBERS if re.search(rf"(?<![\w.]){n}(?![\w.])", code)]
    for name in FUSION_MODES:  # quoted anywhere, or a bare object key
        q = re.escape(name)
        found += [m.group(0) for m in re.finditer(rf"([\"'`]){q}\1", source)]
        found += [m.group(0) for m in re.finditer(rf"(?<![\w+.$-]){q}(?![\w+])\s*:(?!:)", code)]
    return found


def test_extension_holds_no_copy_of_a_rule():
    assert copies_of_rules(GIE_JS.read_text()) == []


def test_the_scan_sees_the_old_copies():
    """What the extension used to carry is caught: the table, constants, maths, mode-keyed maps."""
    old = (
        'export const FUSION_MODE_TABLE = {"vlm": {}};\n'
        "export const PREFERRED_KONTEXT_RESOLUTIONS = [[672, 1568], [688, 1504]];\n"
        "const k = Math.max(Math.ceil(width / rw), Math.ceil(height / rh));\n"
        "const TEXT_LABEL = { vlm: 'a', metaquery: 'b' };\n"
        "if (mode === 'vlm+t5+type') {}\n"
    )
    found = copies_of_rules(old)
    for trace in ("FUSION_MODE_TABLE", "PREFERRED_KONTEXT_RESOLUTIONS", "KONTEXT", "Math.ceil", "672", "1504", '"vlm"',
                  "vlm:", "metaquery:", "'vlm+t5+type'"):
        assert trace in found, trace


# ---------------------------------------------------------------------------------------------
# The extension under node, against a server answering with gie_core.engine.web_rules
# ---------------------------------------------------------------------------------------------


class RulesHandler(http.server.BaseHTTPRequestHandler):
    """ComfyUI's routing as the extension sees it: the pack's routes under /api."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        url = urllib.parse.urlsplit(self.path)
        answer = web_rules.ROUTES.get(url.path.removeprefix("/api"))
        status, body = answer(dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))) if answer else (404, {})
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def rules_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RulesHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


NODE_SCRIPT = (Path(__file__).parent / "web_extension_under_node.mjs")


def run_extension(tmp_path: Path, base: str, cases: list) -> dict:
    source = GIE_JS.read_text()
    assert source.count(APP_IMPORT) == 1 and source.count(API_IMPORT) == 1, \
        "gie.js imports ComfyUI's app and api once each, as the stubs expect"
    stub = ("const app = globalThis.__gieApp;\n"
            "const api = { fetchApi: (route, options) => globalThis.__gieFetchApi(route, options) };")
    module = tmp_path / "gie.mjs"
    module.write_text(source.replace(APP_IMPORT, "").replace(API_IMPORT, stub))
    out = subprocess.run(["node", str(NODE_SCRIPT), module.as_uri(), base, json.dumps(cases)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (the extension's logic runs under node)")
def test_extension_shows_the_servers_rules(tmp_path, rules_server):
    cases = [list(c) for c in pad_cases(24)] + [[80, 48, "default", bad, "center"] for bad in BAD_CUSTOM[:2]]
    got = run_extension(tmp_path, rules_server, cases)
    assert got["registered"] == ["gpt_image_edit.ui"]

    # Pad To Ratio: the server's plan, in two lines; a bad custom list shows the node's message
    def lines(plan):
        sides = [f"{s} {plan[s]}" for s in ("left", "right", "top", "bottom") if plan[s]]
        return (f"snaps to {plan['ratio'][0]}:{plan['ratio'][1]} -> {plan['padded_width']}x{plan['padded_height']}\n"
                f"from {plan['original_width']}x{plan['original_height']}: "
                + (f"+pad {', '.join(sides)} px" if sides else "already at the ratio, no padding"))

    for case, text in zip(cases, got["pad"]):
        status, body = web_rules.pad_plan_answer(query(*case))
        assert text == (lines(body) if status == 200 else f"snap preview: {body['error']}"), case
    assert got["pad"][cases.index([80, 48, "default", "", "center"])] == \
        "snaps to 3:2 -> 81x54\nfrom 80x48: +pad right 1, top 3, bottom 3 px"
    # quick changes: one question, once the widgets stop changing, and it shows the last values
    assert got["debounced"]["asked"] == 1
    assert got["debounced"]["text"] == lines(plan_padding(80, 48, "16:9, 1:1", "top").to_dict())
    assert got["no_image"].startswith("snap preview: connect a Load Image")
    assert got["unreachable"].startswith("snap preview: server unreachable")
    assert got["preview_not_saved"] is True

    # Fusion Connector: per mode of the served table, which inputs show and how they are labelled
    for mode, row in table_for_web().items():
        clip_empty_only = row["pooled_from"] == "empty" and not row["needs_t5"]
        text_label = "text_features (CLIP '' only)" if clip_empty_only else None
        plugged, unplugged = got["fusion"][mode]["plugged"], got["fusion"][mode]["unplugged"]
        if row["needs_qwen"]:
            for look in (plugged, unplugged):
                assert look["hidden"] == [] and look["unused"] == [], mode
                assert ["qwen_features", None] in look["inputs"] and ["text_features", text_label] in look["inputs"]
        else:  # hidden when nothing is plugged in; greyed and marked while a link stays
            assert unplugged["hidden"] == ["qwen_features"] and "qwen_features" not in [s[0] for s in unplugged["inputs"]]
            assert plugged["unused"] == ["qwen_features"] and plugged["hidden"] == []
            assert ["qwen_features", f"qwen_features (unused in {mode})"] in plugged["inputs"]
            assert plugged["link_color"] is not None
    # switching modes brings a hidden input back and hides it again
    assert got["switch"] == [[], ["qwen_features"]]
    # the server cannot be reached: the node says so and leaves its inputs as saved
    assert got["fusion_unreachable"]["error"].startswith("server unreachable")
    assert got["fusion_unreachable"]["inputs"] == ["qwen_features", "text_features"]
    assert got["fusion_unreachable"]["shown"].startswith("inputs shown as saved: server unreachable")
