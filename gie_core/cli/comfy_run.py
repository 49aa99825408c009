"""``gie-comfy-run``: run an API-format workflow on a ComfyUI server, headless.

Uploads the input images, submits the workflow, follows it over the server's websocket with a
progress bar and downloads every image it produced. A pure HTTP client: it imports neither
ComfyUI nor torch, so it runs from any machine that can reach the server.

Exit status: 0 success; 1 the server rejected the workflow, a node failed, the server could not
be reached or ``--timeout`` passed; 2 bad arguments; 130 the prompt was interrupted (Ctrl-C here,
which also interrupts it on the server, or an interrupt from another client).
"""

from __future__ import annotations

import argparse
import copy
import json
import mimetypes
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gie_core.cli.help import HelpFormatter
from gie_core.files import atomic_write_bytes, check_output_path

try:  # optional: websocket-client (a declared dependency); without it /history is polled, no progress bar
    import websocket
except ImportError:
    websocket = None
try:  # optional: tqdm (a declared dependency); without it the run goes on without a progress bar
    from tqdm import tqdm
except ImportError:
    tqdm = None

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_SERVER = "http://127.0.0.1:8188"
# Node classes whose ``image`` input names a file in the server's input folder.
IMAGE_LOADER_CLASSES = ("LoadImage", "LoadImageMask", "LoadImageOutput")
# After execution_success the server stores the history entry a moment later.
HISTORY_GRACE_S = 30.0
# How long the websocket may stay quiet before /history is asked whether the prompt ended.
WS_QUIET_S = 5.0


class RunError(Exception):
    """A failure to report to the user: message printed as is, then exit with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


class DeadlinePassed(Exception):
    """``--timeout`` passed while waiting for the prompt (a slow socket read is not this)."""


# ---------------------------------------------------------------------------------------------
# Workflow editing (no server needed)
# ---------------------------------------------------------------------------------------------


def load_api_workflow(path: str | os.PathLike) -> dict[str, dict]:
    """Read an API-format workflow; a UI-format file is refused with how to export the API one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"workflow {str(p)!r} does not exist", EXIT_USAGE) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"workflow {str(p)!r} is not readable JSON: {e}", EXIT_USAGE) from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "nodes" not in data:
        data = data["prompt"]  # {"prompt": {...}} as posted to /prompt
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        raise RunError(ui_format_message(p), EXIT_USAGE)
    if not isinstance(data, dict) or not data or not all(
        isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs", {}), dict)
        for n in data.values()
    ):
        raise RunError(
            f"workflow {str(p)!r} is not an API-format workflow: expected "
            '{"<id>": {"class_type": ..., "inputs": {...}}, ...}',
            EXIT_USAGE,
        )
    return data


def api_twin(path: str | os.PathLike) -> Path:
    """Where the API-format twin of a UI-format workflow lives: ``<dir>/api/<same name>``.

    The shipped workflows follow this layout (``workflows/X.json`` -> ``workflows/api/X.json``).
    """
    p = Path(path)
    return p.parent / "api" / p.name


def ui_format_message(path: str | os.PathLike) -> str:
    """The refusal of a UI-format workflow, naming its API twin when there is one."""
    p, twin = Path(path), api_twin(path)
    head = f"workflow {str(p)!r} is in the UI format (nodes + links); the server only runs the API format: "
    if twin.is_file():
        return head + f"run its API-format twin {str(twin)!r}, or in ComfyUI use Workflow > Export (API)"
    return head + ("in ComfyUI use Workflow > Export (API) (the shipped workflows/<name>.json have "
                   "API-format twins at workflows/api/<name>.json)")


def _id_order(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _describe(prompt: dict, node_id: str) -> str:
    node = prompt.get(node_id, {})
    title = (node.get("_meta") or {}).get("title")
    cls = node.get("class_type", "?")
    return f'node {node_id} "{title}" ({cls})' if title and title != cls else f"node {node_id} ({cls})"


def find_node(prompt: dict, ref: str) -> str:
    """Resolve ``ref`` (a node id, its ``_meta.title`` or a class_type) to exactly one node id."""
    if ref in prompt:
        return ref

    def title(n: dict) -> str:
        return (n.get("_meta") or {}).get("title") or ""

    for matches_ref in (
        lambda n: title(n) == ref,
        lambda n: title(n).casefold() == ref.casefold(),
        lambda n: n.get("class_type") == ref,
    ):
        matches = [i for i, n in prompt.items() if matches_ref(n)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(_describe(prompt, i) for i in sorted(matches, key=_id_order))
            raise RunError(f"node {ref!r} is ambiguous: it names {names}; use the node id", EXIT_USAGE)
    known = ", ".join(_describe(prompt, i) for i in sorted(prompt, key=_id_order))
    raise RunError(f"node {ref!r} is not in the workflow; its nodes are {known}", EXIT_USAGE)


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (``28``, ``3.5``, ``true``, ``[\"4\", 0]``), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_set(spec: str) -> tuple[str, str, Any]:
    """Split ``NODE.INPUT=VALUE`` into (node ref, input name, parsed value); titles may hold dots."""
    key, sep, raw = spec.partition("=")
    node, dot, name = key.rpartition(".")
    if not sep or not dot or not node.strip() or not name.strip():
        raise RunError(f"--set {spec!r} must look like NODE.INPUT=VALUE, e.g. 'KSampler.steps=4' or '3.seed=7'", EXIT_USAGE)
    return node.strip(), name.strip(), parse_value(raw)


def apply_set(prompt: dict, spec: str, known_inputs: Callable[[str], set[str] | None] | None = None) -> str:
    """Apply one ``--set`` to ``prompt`` in place; return the node id it changed.

    An input not already in the workflow is accepted only when ``known_inputs(class_type)``
    (the server's /object_info) declares it, so a typo fails here rather than being ignored.
    """
    ref, name, value = parse_set(spec)
    node_id = find_node(prompt, ref)
    inputs = prompt[node_id].setdefault("inputs", {})
    if name not in inputs:
        declared = known_inputs(prompt[node_id]["class_type"]) if known_inputs else None
        if not declared or name not in declared:
            have = sorted(set(inputs) | (declared or set()))
            raise RunError(
                f"--set {spec!r}: {_describe(prompt, node_id)} has no input {name!r}; its inputs are {have}",
                EXIT_USAGE,
            )
    inputs[name] = value
    return node_id


def parse_image_arg(spec: str) -> tuple[str | None, str]:
    """``--image path`` -> (None, path); ``--image NODE=path`` -> (NODE, path)."""
    if os.path.exists(spec) or "=" not in spec:
        return None, spec
    node, _, path = spec.partition("=")
    return node.strip(), path


def assign_images(prompt: dict, specs: list[str]) -> list[tuple[str, str]]:
    """Pair each ``--image`` with a loader node: named ones as given, the rest in node-id order.

    Returns [(node_id, local path)]. Files are checked here, before anything is uploaded.
    """
    pairs: list[tuple[str, str]] = []
    unnamed: list[str] = []
    for spec in specs:
        ref, path = parse_image_arg(spec)
        if not Path(path).is_file():
            raise RunError(f"--image {spec!r}: {path!r} is not a file", EXIT_USAGE)
        if ref is None:
            unnamed.append(path)
            continue
        node_id = find_node(prompt, ref)
        if "image" not in prompt[node_id].get("inputs", {}):
            raise RunError(f"--image {spec!r}: {_describe(prompt, node_id)} has no 'image' input", EXIT_USAGE)
        pairs.append((node_id, path))
    named = {n for n, _ in pairs}
    loaders = [
        i for i in sorted(prompt, key=_id_order)
        if prompt[i].get("class_type") in IMAGE_LOADER_CLASSES and i not in named
    ]
    if len(unnamed) > len(loaders):
        what = ", ".join(_describe(prompt, i) for i in loaders) or "none"
        raise RunError(
            f"{len(unnamed)} --image without a node name but the workflow has {len(loaders)} free "
            f"image loader(s) ({what}); name the node with --image NODE=path",
            EXIT_USAGE,
        )
    pairs.extend(zip(loaders, unnamed))
    return pairs


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


def server_url(text: str) -> str:
    """The ``--server`` URL as ``http(s)://host[:port][/path]``; a bare ``host:port`` gets ``http://``."""
    url = text.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    try:
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number, or out of range
        ok = False
    if not ok:
        raise RunError(f"--server {text!r} is not the http(s) URL of a ComfyUI server, e.g. {DEFAULT_SERVER}", EXIT_USAGE)
    return url


class ComfyClient:
    """The few ComfyUI HTTP endpoints a headless run needs (stdlib ``urllib`` only)."""

    def __init__(self, server: str, client_id: str | None = None, http_timeout: float = 60.0):
        self.base = server_url(server)
        self.client_id = client_id or uuid.uuid4().hex
        self.http_timeout = http_timeout
        self._object_info: dict[str, Any] = {}

    # -- plumbing
    def _open(self, path: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {}, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.http_timeout)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RunError(f"cannot reach the ComfyUI server at {self.base}: {reason}") from None

    def get_json(self, path: str) -> Any:
        with self._open(path) as r:
            return json.loads(r.read().decode("utf-8"))

    def post_json(self, path: str, payload: Any) -> Any:
        body = json.dumps(payload).encode("utf-8")
        with self._open(path, body, {"Content-Type": "application/json"}, "POST") as r:
            raw = r.read()
        return json.loads(raw.decode("utf-8")) if raw.strip() else None

    # -- endpoints
    def upload_image(self, path: str | os.PathLike) -> str:
        """POST /upload/image; return the value for a LoadImage ``image`` input."""
        p = Path(path)
        boundary = "----gie" + uuid.uuid4().hex
        ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        parts = [
            (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{p.name}"\r\n'
             f"Content-Type: {ctype}\r\n\r\n").encode("utf-8") + p.read_bytes() + b"\r\n",
            f'--{boundary}\r\nContent-Disposition: form-data; name="type"\r\n\r\ninput\r\n'.encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        try:
            with self._open("/upload/image", b"".join(parts),
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"}, "POST") as r:
                info = json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise RunError(f"uploading {str(p)!r} failed: HTTP {e.code} {e.reason}") from None
        name, sub = info["name"], info.get("subfolder") or ""
        return f"{sub}/{name}" if sub else name

    def inputs_of(self, class_type: str) -> set[str] | None:
        """Input names /object_info declares for ``class_type`` (None if the server does not know it)."""
        if class_type not in self._object_info:
            try:
                info = self.get_json("/object_info/" + urllib.parse.quote(class_type, safe=""))
            except urllib.error.HTTPError:
                info = {}
            self._object_info[class_type] = info.get(class_type)
        spec = self._object_info[class_type]
        if not spec:
            return None
        req = spec.get("input") or {}
        return set(req.get("required") or {}) | set(req.get("optional") or {})

    def queue_prompt(self, prompt: dict) -> str:
        """POST /prompt; return the prompt id or raise :class:`RunError` with the node errors."""
        try:
            res = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", "replace")
            try:
                data = json.loads(body)
            except ValueError:
                raise RunError(f"the server refused the workflow: HTTP {e.code}: {body.strip()[:2000]}") from None
            raise RunError(format_validation_errors(data, prompt)) from None
        return res["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        data = self.get_json("/history/" + urllib.parse.quote(prompt_id))
        return data.get(prompt_id) if isinstance(data, dict) else None

    def download(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({
            "filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image.get("type", "output"),
        })
        with self._open("/view?" + query) as r:
            return r.read()

    def interrupt(self, prompt_id: str) -> None:
        """Stop ``prompt_id`` if it is running and drop it from the queue if it is waiting."""
        for path, payload in (("/interrupt", {"prompt_id": prompt_id}), ("/queue", {"delete": [prompt_id]})):
            try:
                self.post_json(path, payload)
            except (RunError, urllib.error.HTTPError):
                pass

    def ws_url(self) -> str:
        u = urllib.parse.urlsplit(self.base)
        scheme = "wss" if u.scheme == "https" else "ws"
        return urllib.parse.urlunsplit((scheme, u.netloc, u.path + "/ws", f"clientId={self.client_id}", ""))


# ---------------------------------------------------------------------------------------------
# Error formatting
# ---------------------------------------------------------------------------------------------


def _error_line(err: dict) -> str:
    msg = str(err.get("message") or err.get("type") or "error")
    details = str(err.get("details") or "").strip()
    return f"{msg}: {details}" if details and details not in msg else msg


def format_validation_errors(data: dict, prompt: dict) -> str:
    """The 400 answer of POST /prompt as readable lines: the reason, then each node's errors."""
    top = data.get("error")
    lines = ["the server rejected the workflow: " + (_error_line(top) if isinstance(top, dict) else str(top or "invalid prompt"))]
    node_errors = data.get("node_errors") or {}
    for node_id in sorted(node_errors, key=_id_order):
        ne = node_errors[node_id] or {}
        cls = ne.get("class_type") or prompt.get(node_id, {}).get("class_type", "?")
        title = (prompt.get(node_id, {}).get("_meta") or {}).get("title")
        head = f'  node {node_id} "{title}" ({cls}):' if title and title != cls else f"  node {node_id} ({cls}):"
        lines.append(head)
        for err in ne.get("errors") or []:
            lines.append("    - " + _error_line(err))
    return "\n".join(lines)


def format_execution_error(msg: dict, prompt: dict, verbose: bool = False) -> str:
    node_id = str(msg.get("node_id", "?"))
    cls = msg.get("node_type") or prompt.get(node_id, {}).get("class_type", "?")
    title = (prompt.get(node_id, {}).get("_meta") or {}).get("title")
    where = f'node {node_id} "{title}" ({cls})' if title and title != cls else f"node {node_id} ({cls})"
    text = f"{where} failed: {msg.get('exception_type', 'Error')}: {str(msg.get('exception_message', '')).strip()}"
    tb = msg.get("traceback") or []
    if verbose and tb:
        text += "\n" + "".join(tb).rstrip()
    return text


# ---------------------------------------------------------------------------------------------
# Following a prompt
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """How a prompt ended: ``status`` is 'success', 'error' or 'interrupted'."""

    status: str
    message: dict = field(default_factory=dict)


class Progress:
    """A tqdm bar that shows the running node's title and its step progress (value/max)."""

    def __init__(self, prompt: dict, enabled: bool):
        self.prompt = prompt
        self.enabled = enabled
        self.bar = None
        self.node: str | None = None

    def _ensure_bar(self, desc: str = "running"):
        """The bar appears with the first node that runs (nothing is drawn for a cached prompt)."""
        if self.bar is None and self.enabled:
            if tqdm is None:  # degrade to no bar rather than fail a run
                self.enabled = False
                return None
            self.bar = tqdm(total=1, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
        return self.bar

    def _title(self, node_id: str) -> str:
        node = self.prompt.get(node_id, {})
        return (node.get("_meta") or {}).get("title") or node.get("class_type") or node_id

    def executing(self, node_id: str) -> None:
        if node_id == self.node or self._ensure_bar(f"#{node_id} {self._title(node_id)}") is None:
            return
        self.node = node_id
        self.bar.reset(total=1)
        self.bar.set_description_str(f"#{node_id} {self._title(node_id)}", refresh=True)

    def progress(self, node_id: str | None, value: int, maximum: int) -> None:
        if node_id and node_id != self.node:
            self.executing(node_id)
        if self._ensure_bar() is None:
            return
        if self.bar.total != maximum:
            self.bar.reset(total=max(1, maximum))
        self.bar.n = value
        self.bar.refresh()

    def close(self) -> None:
        self.enabled = False
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _open_websocket(client: ComfyClient):
    """Connect before queueing so no message is missed; None when websocket-client is missing."""
    if websocket is None:
        return None
    try:
        return websocket.create_connection(client.ws_url(), timeout=client.http_timeout)
    except Exception as e:  # noqa: BLE001 - any failure just means we poll /history instead
        print(f"warning: no websocket ({e}); polling /history instead, without progress", file=sys.stderr)
        return None


def _outcome_from_history(entry: dict) -> Outcome:
    status = entry.get("status") or {}
    for event, data in reversed(status.get("messages") or []):
        if event == "execution_interrupted":
            return Outcome("interrupted", data)
        if event == "execution_error":
            return Outcome("error", data)
    return Outcome("success" if status.get("completed", True) and status.get("status_str", "success") == "success" else "error")


def follow_websocket(ws, prompt_id: str, progress: Progress, deadline: float,
                     client: ComfyClient | None = None) -> Outcome | None:
    """Read websocket messages until ``prompt_id`` ends; None if the socket dropped first.

    After ``WS_QUIET_S`` quiet seconds the history is asked too, so a missed message cannot stall the run.
    """
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlinePassed
        ws.settimeout(min(remaining, WS_QUIET_S))
        try:
            frame = ws.recv()
        except websocket.WebSocketTimeoutException:
            entry = client.history(prompt_id) if client is not None else None
            if entry:
                return _outcome_from_history(entry)
            continue
        except (websocket.WebSocketException, OSError):
            return None
        if not isinstance(frame, str):
            continue  # binary frames are latent previews
        try:
            msg = json.loads(frame)
        except ValueError:
            continue
        kind, data = msg.get("type"), msg.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            continue  # another client's prompt (interrupts are broadcast)
        if kind == "executing" and data.get("node") is not None:
            progress.executing(str(data["node"]))
        elif kind == "progress":
            progress.progress(str(data.get("node")) if data.get("node") is not None else None,
                              int(data.get("value", 0)), int(data.get("max", 1)))
        elif kind == "execution_success" and data.get("prompt_id") == prompt_id:
            return Outcome("success", data)
        elif kind == "execution_error" and data.get("prompt_id") == prompt_id:
            return Outcome("error", data)
        elif kind == "execution_interrupted" and data.get("prompt_id") == prompt_id:
            return Outcome("interrupted", data)


def wait_history(client: ComfyClient, prompt_id: str, deadline: float, poll_s: float = 0.5) -> dict:
    """Poll /history/<id> until the prompt's entry is stored."""
    while True:
        entry = client.history(prompt_id)
        if entry:
            return entry
        if time.monotonic() >= deadline:
            raise DeadlinePassed
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def output_images(entry: dict) -> list[dict]:
    """Every image a history entry lists, in node-id order (SaveImage 'output' and preview 'temp')."""
    found = []
    outputs = entry.get("outputs") or {}
    for node_id in sorted(outputs, key=_id_order):
        for items in (outputs[node_id] or {}).values():
            if isinstance(items, list):
                found += [i for i in items if isinstance(i, dict) and "filename" in i]
    return found


def download_outputs(client: ComfyClient, entry: dict, outdir: Path) -> list[Path]:
    """Save every output image of ``entry`` under ``outdir`` (server file names, never overwritten)."""
    outdir.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    for image in output_images(entry):
        name = Path(image["filename"]).name
        dest = outdir / name
        stem, suffix, n = dest.stem, dest.suffix, 1
        while dest.exists() or dest in saved:
            dest = outdir / f"{stem}-{n}{suffix}"
            n += 1
        atomic_write_bytes(dest, client.download(image))
        saved.append(dest)
    return saved


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gie-comfy-run",
        description="Run an API-format ComfyUI workflow on a running ComfyUI server and download its images.",
        formatter_class=HelpFormatter,
        epilog=(
            "examples:\n"
            "  gie-comfy-run workflows/api/released_model_edit.json --image photo.png \\\n"
            "      --set 'Instruction.value=make it winter' --set GIEKontextSampler.steps=28 -o out/\n"
            "  gie-comfy-run workflows/api/three_turn_edit_chain.json --image 3=photo.png \\\n"
            "      --set 'Turn 3 instruction.value=make it a pencil sketch' --set 20.seed=7 \\\n"
            "      --server http://gpu-box:8188\n"
            "\n"
            "The shipped API-format workflows are workflows/api/*.json (their UI-format twins, for\n"
            "the ComfyUI editor, are workflows/*.json of the same name).\n"
            "\n"
            "NODE is a node id, its title (_meta.title) or its class_type when unique; VALUE is JSON\n"
            "when it parses (28, 3.5, true, \"text\") and a plain string otherwise.\n"
            "exit status: 0 ok, 1 rejected/failed/timeout, 2 bad arguments, 130 interrupted"
        ),
    )
    p.add_argument("workflow", help="API-format workflow JSON (Workflow > Export (API) in ComfyUI)")
    p.add_argument("--server", default=os.environ.get("COMFYUI_SERVER", DEFAULT_SERVER),
                   help=f"ComfyUI server URL (default $COMFYUI_SERVER or {DEFAULT_SERVER})")
    p.add_argument("--image", action="append", default=[], metavar="[NODE=]PATH",
                   help="upload PATH and set it as a LoadImage node's image; without NODE the first free "
                        "LoadImage in id order (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="NODE.INPUT=VALUE",
                   help="set a node input before queueing (repeatable)")
    p.add_argument("-o", "--output-dir", default=".", help="where the images are saved (default: current directory)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up after this long (the prompt keeps running on the server); default: wait")
    p.add_argument("--client-id", default=None, help="websocket client id (default: a random one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print the server's traceback when a node fails")
    return p


def check_timeout(seconds: float | None) -> None:
    """``--timeout`` is a positive number of seconds, or left out to wait as long as it takes."""
    if seconds is not None and not seconds > 0:  # also refuses nan
        raise RunError(f"--timeout {seconds:g} must be a positive number of seconds "
                       "(leave it out to wait as long as the prompt takes)", EXIT_USAGE)


def check_output_dir(path: str | os.PathLike) -> Path:
    """``--output-dir`` is a folder, or can be made, and is writable: checked before anything is sent."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir '{out}' is a file, not a folder", EXIT_USAGE)
    try:
        check_output_path(out / "image.png", f"--output-dir '{out}': an image")
    except ValueError as e:
        raise RunError(str(e), EXIT_USAGE) from None
    return out


def check_arguments(args: argparse.Namespace) -> tuple[dict, list[tuple[str, str]], ComfyClient, Path]:
    """Every argument checked before anything is sent (a bad one exits 2): the workflow (a copy,
    the file is never edited), the server URL, ``--timeout``, ``--output-dir``, the images and
    the ``--set`` specs (an input the workflow leaves out is looked up in the server's
    /object_info, which only reads)."""
    check_timeout(args.timeout)
    prompt = copy.deepcopy(load_api_workflow(args.workflow))
    client = ComfyClient(args.server, args.client_id)
    outdir = check_output_dir(args.output_dir)
    images = assign_images(prompt, args.image)
    for spec in args.sets:
        parse_set(spec)  # every syntax error first, before the server is asked anything
    trial = copy.deepcopy(prompt)
    for spec in args.sets:
        apply_set(trial, spec, client.inputs_of)
    return prompt, images, client, outdir


def execute(client: ComfyClient, prompt: dict, args: argparse.Namespace, deadline: float) -> tuple[str, dict, float]:
    """Queue ``prompt``, follow it to its end and return (prompt id, history entry, seconds it took).

    Raises :class:`RunError` when it failed, was interrupted or ``--timeout`` passed; Ctrl-C here
    interrupts it on the server too.
    """
    ws = _open_websocket(client)
    progress = Progress(prompt, enabled=not args.quiet and ws is not None)
    prompt_id = None
    try:
        prompt_id = client.queue_prompt(prompt)
        queued_at = time.monotonic()
        print(f"queued prompt {prompt_id} on {client.base}", file=sys.stderr)
        outcome = follow_websocket(ws, prompt_id, progress, deadline, client) if ws is not None else None
        progress.close()
        if outcome is None:  # no websocket, or it dropped: the history says how it ended
            outcome = _outcome_from_history(wait_history(client, prompt_id, deadline))
        if outcome.status == "interrupted":
            raise RunError(f"prompt {prompt_id} was interrupted on the server", EXIT_INTERRUPTED)
        if outcome.status == "error":
            raise RunError(format_execution_error(outcome.message, prompt, args.verbose))
        entry = wait_history(client, prompt_id, min(deadline, time.monotonic() + HISTORY_GRACE_S))
    except DeadlinePassed:
        raise RunError(
            f"gave up after --timeout {args.timeout:g} s; prompt {prompt_id} is still queued or running on the server"
        ) from None
    except KeyboardInterrupt:
        progress.close()
        if prompt_id is not None:
            client.interrupt(prompt_id)
            print(f"\ninterrupted: prompt {prompt_id} was stopped on the server", file=sys.stderr)
        raise RunError("interrupted", EXIT_INTERRUPTED) from None
    finally:
        progress.close()
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001
                pass
    return prompt_id, entry, time.monotonic() - queued_at


def run(args: argparse.Namespace) -> int:
    """One headless run: check the arguments, upload and set inputs, queue and follow, download."""
    prompt, images, client, outdir = check_arguments(args)
    deadline = time.monotonic() + args.timeout if args.timeout else float("inf")
    for node_id, path in images:
        name = client.upload_image(path)
        prompt[node_id]["inputs"]["image"] = name
        print(f"uploaded {path} -> {_describe(prompt, node_id)} image={name!r}", file=sys.stderr)
    for spec in args.sets:
        apply_set(prompt, spec, client.inputs_of)
    prompt_id, entry, seconds = execute(client, prompt, args, deadline)
    saved = download_outputs(client, entry, outdir)
    print(f"prompt {prompt_id} succeeded in {seconds:.1f} s; {len(saved)} image(s) saved to {args.output_dir}",
          file=sys.stderr)
    for path in saved:
        print(path)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gie-comfy-run``; returns the exit status (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's own errors (2, its message printed) and --help (0), returned as such
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return run(args)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # an unexpected HTTP answer (e.g. /view failing), or a full disk while saving
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
