"""``gie-comfy-run`` against a small in-test fake of the ComfyUI HTTP + websocket API.

The fake speaks just enough of the protocol (upload, /prompt, /ws, /history, /view,
/interrupt, /object_info) to pin the client's behaviour: what it sends, what it prints and its
exit status. The real server is exercised in ``test_comfy_server.py``.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import queue
import re
import select
import shlex
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gie_core.cli import comfy_run
from gie_core.cli.comfy_run import RunError, apply_set, assign_images, find_node, main, parse_set, parse_value

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)

WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Load Image"}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Style.ref"}},
    "3": {"class_type": "KSampler", "inputs": {"steps": 20, "seed": 0, "model": ["4", 0]}, "_meta": {"title": "Sampler"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "gie"}, "_meta": {"title": "Save"}},
}
UI_WORKFLOW = {"last_node_id": 1, "nodes": [{"id": 1, "type": "LoadImage"}], "links": [], "version": 0.4}
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class FakeComfy:
    """Scenario-driven fake server. ``mode``: success, invalid, error, interrupted, hang."""

    def __init__(self, mode="success", websocket=True, silent=False):
        self.mode, self.websocket, self.silent = mode, websocket, silent
        self.uploads: list[tuple[str, bytes]] = []
        self.prompts: list[dict] = []
        self.interrupts: list[dict] = []
        self.history: dict[str, dict] = {}
        self.clients: dict[str, queue.Queue] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/ws" and fake.websocket:
                    return fake._serve_ws(self, q["clientId"])
                if url.path.startswith("/history/"):
                    pid = url.path.rsplit("/", 1)[1]
                    return self._json({pid: fake.history[pid]} if pid in fake.history else {})
                if url.path == "/view":
                    body = (q["type"] + ":" + q["filename"]).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    return self.wfile.write(body)
                if url.path == "/object_info/KSampler":
                    return self._json({"KSampler": {"input": {"required": {"steps": [], "seed": [], "model": []},
                                                              "optional": {"denoise": []}}}})
                self._json({}, 404)

            def do_POST(self):
                body = self._body()
                if self.path == "/upload/image":
                    head, _, rest = body.partition(b"\r\n\r\n")
                    name = head.split(b'filename="')[1].split(b'"')[0].decode()
                    fake.uploads.append((name, rest.split(b"\r\n--")[0]))
                    return self._json({"name": "up_" + name, "subfolder": "", "type": "input"})
                if self.path == "/interrupt":
                    fake.interrupts.append(json.loads(body or b"{}"))
                    return self._json({})
                if self.path == "/queue":
                    return self._json({})
                if self.path == "/prompt":
                    return fake._prompt(self, json.loads(body))
                self._json({}, 404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- /prompt: validate, then play the scenario to the websocket and store the history
    def _prompt(self, h, payload):
        self.prompts.append(payload)
        if self.mode == "invalid":
            return h._json({
                "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                          "details": "", "extra_info": {}},
                "node_errors": {"3": {"class_type": "KSampler", "dependent_outputs": ["9"], "errors": [
                    {"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1",
                     "details": "steps", "extra_info": {}}]}},
            }, 400)
        pid = "p-1"
        out = {"images": [{"filename": "gie_00001_.png", "subfolder": "", "type": "output"}]}
        msgs = [("execution_start", {}), ("executing", {"node": "3"}),
                ("progress", {"value": 1, "max": 2, "node": "3"}), ("progress", {"value": 2, "max": 2, "node": "3"})]
        status = {"status_str": "success", "completed": True, "messages": []}
        if self.mode == "success":
            msgs += [("executing", {"node": "9"}), ("executed", {"node": "9", "output": out}), ("execution_success", {})]
            outputs = {"9": out, "3": {"text": ["not an image"]}}
        elif self.mode == "error":
            err = {"node_id": "3", "node_type": "KSampler", "exception_type": "RuntimeError",
                   "exception_message": "mat1 and mat2 shapes cannot be multiplied", "traceback": ["Traceback: x\n"]}
            msgs.append(("execution_error", err))
            outputs, status = {}, {"status_str": "error", "completed": False, "messages": [["execution_error", err]]}
        elif self.mode == "interrupted":
            msgs.append(("execution_interrupted", {"node_id": "3", "node_type": "KSampler"}))
            outputs = {}
            status = {"status_str": "error", "completed": False,
                      "messages": [["execution_interrupted", {"node_id": "3"}]]}
        else:  # hang: never finishes
            outputs, status = None, None
        client = self.clients.get(payload.get("client_id"))
        # another client's traffic must be ignored
        other = [("executing", {"node": "7", "prompt_id": "other"}), ("execution_success", {"prompt_id": "other"})]
        for kind, data in other + msgs:
            if client is not None and not self.silent:
                client.put(json.dumps({"type": kind, "data": {"prompt_id": pid, **data}}))
        if outputs is not None:
            self.history[pid] = {"prompt": [], "outputs": outputs, "status": status}
        return h._json({"prompt_id": pid, "number": 1, "node_errors": {}})

    # -- a minimal RFC 6455 server side: handshake, unmasked text frames out, stop on close/EOF
    def _serve_ws(self, h, client_id):
        # the queue exists before the handshake answer, so a prompt posted right after connecting is heard
        q = self.clients.setdefault(client_id, queue.Queue())
        accept = base64.b64encode(hashlib.sha1((h.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest()).decode()
        h.send_response(101)
        h.send_header("Upgrade", "websocket")
        h.send_header("Connection", "Upgrade")
        h.send_header("Sec-WebSocket-Accept", accept)
        h.end_headers()
        h.wfile.flush()
        q.put(json.dumps({"type": "status", "data": {"sid": client_id}}))
        sock = h.connection
        while True:
            if select.select([sock], [], [], 0)[0]:
                return  # the client sent a close frame (or hung up)
            try:
                text = q.get(timeout=0.02).encode()
            except queue.Empty:
                continue
            n = len(text)
            head = bytes([0x81, n]) if n < 126 else bytes([0x81, 126]) + n.to_bytes(2, "big")
            sock.sendall(head + text)


@pytest.fixture
def fake(request):
    server = FakeComfy(**getattr(request, "param", {}))
    yield server
    server.close()


@pytest.fixture
def files(tmp_path):
    wf = tmp_path / "wf_api.json"
    wf.write_text(json.dumps(WORKFLOW))
    img = tmp_path / "in.png"
    img.write_bytes(PNG)
    return wf, img, tmp_path / "out"


def run(fake, *args):
    timeout = [] if "--timeout" in args else ["--timeout", "30"]  # a bug fails the test instead of hanging it
    return main([*map(str, args), "--server", fake.url, "--quiet", *timeout])


# ---------------------------------------------------------------------------------------------
# Against the fake server
# ---------------------------------------------------------------------------------------------


def test_success_uploads_sets_follows_and_downloads(fake, files, capsys):
    wf, img, out = files
    code = run(fake, wf, "--image", img, "--set", "Sampler.steps=4", "--set", "3.denoise=0.5",
               "--set", "Save.filename_prefix=x y", "-o", out, "--client-id", "me")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert fake.uploads == [("in.png", PNG)]
    sent = fake.prompts[0]
    assert sent["client_id"] == "me"
    p = sent["prompt"]
    assert p["1"]["inputs"]["image"] == "up_in.png" and p["2"]["inputs"]["image"] == "example.png"
    assert p["3"]["inputs"]["steps"] == 4 and p["3"]["inputs"]["denoise"] == 0.5
    assert p["9"]["inputs"]["filename_prefix"] == "x y" and p["3"]["inputs"]["model"] == ["4", 0]
    saved = out / "gie_00001_.png"
    assert saved.read_bytes() == b"output:gie_00001_.png"
    assert captured.out.strip().splitlines() == [str(saved)]
    assert not list(out.glob("*.part"))
    assert json.loads(wf.read_text()) == WORKFLOW  # the file itself is never edited


def test_second_run_does_not_overwrite_earlier_outputs(fake, files, capsys):
    wf, img, out = files
    assert run(fake, wf, "-o", out) == 0
    assert run(fake, wf, "-o", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gie_00001_-1.png", "gie_00001_.png"]


@pytest.mark.parametrize("fake", [{"websocket": False}], indirect=True)
def test_without_websocket_polls_history(fake, files, capsys):
    wf, img, out = files
    assert run(fake, wf, "-o", out) == 0
    assert (out / "gie_00001_.png").exists()


@pytest.mark.parametrize("fake", [{"silent": True}], indirect=True)
def test_a_quiet_websocket_falls_back_to_the_history(fake, files, capsys, monkeypatch):
    monkeypatch.setattr(comfy_run, "WS_QUIET_S", 0.2)
    wf, img, out = files
    assert run(fake, wf, "-o", out) == 0
    assert (out / "gie_00001_.png").exists()


@pytest.mark.parametrize("fake", [{"mode": "invalid"}], indirect=True)
def test_validation_failure_prints_node_errors(fake, files, capsys):
    wf, img, out = files
    assert run(fake, wf, "-o", out) == 1
    err = capsys.readouterr().err
    assert "Prompt outputs failed validation" in err
    assert 'node 3 "Sampler" (KSampler):' in err
    assert "Value 0 smaller than min of 1: steps" in err
    assert not out.exists()


@pytest.mark.parametrize("fake", [{"mode": "error"}], indirect=True)
def test_execution_error_prints_node_and_exception(fake, files, capsys):
    wf, img, out = files
    assert run(fake, wf, "-o", out, "--verbose") == 1
    err = capsys.readouterr().err
    assert 'node 3 "Sampler" (KSampler) failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied' in err
    assert "Traceback" in err


@pytest.mark.parametrize("fake", [{"mode": "error", "websocket": False}], indirect=True)
def test_execution_error_from_history_when_polling(fake, files, capsys):
    wf, img, out = files
    assert run(fake, wf, "-o", out) == 1
    assert "mat1 and mat2" in capsys.readouterr().err


@pytest.mark.parametrize("fake", [{"mode": "interrupted"}], indirect=True)
def test_interrupted_on_server_exits_130(fake, files, capsys):
    wf, img, out = files
    assert run(fake, wf, "-o", out) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("fake", [{"mode": "hang"}], indirect=True)
def test_timeout_gives_up_with_exit_1(fake, files, capsys):
    wf, img, out = files
    assert run(fake, wf, "-o", out, "--timeout", "0.3") == 1
    assert "gave up after --timeout 0.3 s; prompt p-1" in capsys.readouterr().err


@pytest.mark.parametrize("fake", [{"mode": "hang"}], indirect=True)
def test_ctrl_c_interrupts_the_prompt_on_the_server(fake, files, capsys, monkeypatch):
    wf, img, out = files

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(comfy_run, "follow_websocket", boom)
    assert run(fake, wf, "-o", out) == 130
    assert fake.interrupts == [{"prompt_id": "p-1"}]


@pytest.mark.parametrize("spec, message", [
    ("Nope.steps=1", "node 'Nope' is not in the workflow"),
    ("Sampler.sed=1", "has no input 'sed'"),
    ("Sampler=1", "must look like NODE.INPUT=VALUE"),
    ("LoadImage.image=x.png", "node 'LoadImage' is ambiguous"),
])
def test_bad_set_is_a_usage_error_and_nothing_is_queued(fake, files, capsys, spec, message):
    wf, img, out = files
    assert run(fake, wf, "--set", spec) == 2
    assert message in capsys.readouterr().err
    assert fake.prompts == []


def test_ui_format_workflow_is_refused_with_a_hint(fake, tmp_path, capsys):
    wf = tmp_path / "ui.json"
    wf.write_text(json.dumps(UI_WORKFLOW))
    assert run(fake, wf) == 2  # a bad argument, as the README says
    assert "Export (API)" in capsys.readouterr().err
    assert fake.prompts == [] and fake.uploads == []


def _bad_workflow(tmp_path, text):
    wf = tmp_path / "bad.json"
    wf.write_text(text)
    return wf


# (arguments before --server/--quiet/--timeout, with {wf} the good workflow, {img} an image, {tmp} the folder;
#  what stderr must say)
BAD_ARGUMENTS = {
    "unknown option": (["{wf}", "--bogus"], "unrecognized arguments: --bogus"),
    "missing workflow": ([], "the following arguments are required: workflow"),
    "timeout not a number": (["{wf}", "--timeout", "soon"], "--timeout: invalid float value: 'soon'"),
    "timeout zero": (["{wf}", "--timeout", "0"], "--timeout 0 must be a positive number of seconds"),
    "timeout negative": (["{wf}", "--timeout", "-5"], "--timeout -5 must be a positive number of seconds"),
    "workflow missing": (["{tmp}/nope.json"], "nope.json' does not exist"),
    "workflow not json": (["{tmp}/notjson.json"], "is not readable JSON"),
    "workflow not api": (["{tmp}/list.json"], "is not an API-format workflow"),
    "set malformed": (["{wf}", "--set", "Sampler.steps"], "must look like NODE.INPUT=VALUE"),
    "set unknown input, with an image": (["{wf}", "--image", "{img}", "--set", "Sampler.sed=1"], "has no input 'sed'"),
    "image missing": (["{wf}", "--image", "{tmp}/missing.png"], "is not a file"),
    "image on a node without one": (["{wf}", "--image", "Sampler={img}"], "has no 'image' input"),
    "too many images": (["{wf}", "--image", "{img}", "--image", "{img}", "--image", "{img}"], "3 --image without a node name"),
    "output dir is a file": (["{wf}", "--image", "{img}", "-o", "{img}"], "--output-dir '{img}' is a file, not a folder"),
    "server not http": (["{wf}", "--server", "ftp://host/x"], "--server 'ftp://host/x' is not the http(s) URL"),
    "server port not a number": (["{wf}", "--server", "http://host:port"], "is not the http(s) URL"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_exit_2_before_anything_is_sent(case, fake, files, capsys):
    """Every bad argument (argparse's own errors included) exits 2 with a message naming it, as the
    README documents, and nothing reaches the server: no upload, no prompt."""
    wf, img, _ = files
    tmp = wf.parent
    (tmp / "notjson.json").write_text("{not json")
    (tmp / "list.json").write_text(json.dumps([1, 2]))
    argv, message = BAD_ARGUMENTS[case]
    fill = {"wf": wf, "img": img, "tmp": tmp}
    argv = [a.format(**fill) for a in argv]
    server = [] if "--server" in argv else ["--server", fake.url]
    out = [] if "-o" in argv or not argv else ["-o", str(tmp / "out")]  # never the current folder, even when broken
    assert main([*argv, *server, *out, "--quiet"]) == 2
    assert message.format(**fill) in capsys.readouterr().err
    assert fake.prompts == [] and fake.uploads == []


def test_bad_arguments_exit_2_from_the_command_and_help_exits_0(files):
    """The same through the installed command's entry (``sys.exit(main())``), not only ``main()``."""
    wf, _, _ = files
    cmd = [sys.executable, "-m", "gie_core.cli.comfy_run"]
    bad = subprocess.run([*cmd, str(wf), "--bogus"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
    ui = wf.parent / "ui.json"
    ui.write_text(json.dumps(UI_WORKFLOW))
    refused = subprocess.run([*cmd, str(ui), "--server", "http://127.0.0.1:9"], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "Export (API)" in refused.stderr
    shown = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=REPO)
    assert shown.returncode == 0 and "usage: gie-comfy-run" in shown.stdout


def test_unreachable_server_is_a_clear_error(files, capsys):
    wf, img, out = files
    assert main([str(wf), "--server", "http://127.0.0.1:9", "--quiet"]) == 1
    assert "cannot reach the ComfyUI server at http://127.0.0.1:9" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_values_are_json_when_they_parse():
    assert parse_value("28") == 28 and parse_value("3.5") == 3.5 and parse_value("true") is True
    assert parse_value('["4", 0]') == ["4", 0] and parse_value("make it winter") == "make it winter"
    assert parse_set("Style.ref.image=a=b.png") == ("Style.ref", "image", "a=b.png")


def test_node_refs_resolve_by_id_title_case_insensitive_title_and_unique_class():
    p = json.loads(json.dumps(WORKFLOW))
    assert find_node(p, "3") == "3" and find_node(p, "Sampler") == "3" and find_node(p, "sampler") == "3"
    assert find_node(p, "KSampler") == "3" and find_node(p, "Style.ref") == "2"
    assert apply_set(p, "Style.ref.image=b.png") == "2" and p["2"]["inputs"]["image"] == "b.png"


def test_images_fill_loaders_in_id_order_unless_named(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(PNG)
    b.write_bytes(PNG)
    assert assign_images(WORKFLOW, [str(a), str(b)]) == [("1", str(a)), ("2", str(b))]
    assert assign_images(WORKFLOW, [str(a), f"Load Image={b}"]) == [("1", str(b)), ("2", str(a))]
    with pytest.raises(RunError, match="3 --image without a node name"):
        assign_images(WORKFLOW, [str(a)] * 3)
    with pytest.raises(RunError, match="is not a file"):
        assign_images(WORKFLOW, [str(tmp_path / "missing.png")])


def test_client_imports_neither_torch_nor_comfy():
    code = "import sys, gie_core.cli.comfy_run; bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'comfy')]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------------------------------
# What --help and the hints name exists in the repo
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def help_examples() -> list[list[str]]:
    """The example command lines of ``--help`` (backslash continuations joined), as argv lists."""
    text = comfy_run.build_parser().format_help()
    joined = text.replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in joined.splitlines() if line.strip().startswith("gie-comfy-run ")]


def test_help_examples_name_real_workflows_nodes_and_inputs():
    examples = help_examples()
    assert len(examples) >= 2
    for argv in examples:
        args = comfy_run.build_parser().parse_args(argv)
        path = REPO / args.workflow
        assert path.is_file(), f"--help names {args.workflow}, which is not in the repo"
        prompt = comfy_run.load_api_workflow(path)  # the API format, not a UI one
        for spec in args.sets:
            apply_set(json.loads(json.dumps(prompt)), spec)  # node and input exist (no server to declare more)
        for spec in args.image:
            ref, _ = comfy_run.parse_image_arg(spec)
            if ref is not None:
                assert "image" in prompt[find_node(prompt, ref)]["inputs"], spec
        if not any(comfy_run.parse_image_arg(s)[0] for s in args.image):
            loaders = [n for n in prompt.values() if n["class_type"] in comfy_run.IMAGE_LOADER_CLASSES]
            assert len(loaders) >= len(args.image), argv


def test_every_workflow_path_in_help_exists():
    text = comfy_run.build_parser().format_help()
    named = set(re.findall(r"workflows/[\w/*.<>-]+\.json", text))
    assert named
    for name in named:
        assert glob.glob(str(REPO / name)), f"--help names {name}, which matches nothing in the repo"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "workflows").glob("*.json")))
def test_ui_format_hint_names_the_shipped_api_twin(name, monkeypatch):
    monkeypatch.chdir(REPO)
    twin = Path("workflows/api") / name
    assert twin.is_file()
    with pytest.raises(RunError) as e:
        comfy_run.load_api_workflow(Path("workflows") / name)
    assert f"run its API-format twin '{twin}'" in str(e.value)
    comfy_run.load_api_workflow(twin)  # and the twin is accepted


def test_ui_format_hint_without_a_twin_says_where_shipped_twins_live(tmp_path):
    wf = tmp_path / "ui.json"
    wf.write_text(json.dumps(UI_WORKFLOW))
    with pytest.raises(RunError, match=r"Export \(API\).*workflows/api/<name>\.json"):
        comfy_run.load_api_workflow(wf)
