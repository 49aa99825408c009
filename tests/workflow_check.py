"""Checks shipped workflows against the node definitions, without ComfyUI.

- every node type exists: ours from ``NODE_CLASS_MAPPINGS``, native ones from :data:`NATIVE_NODES`
  (a small table of the ComfyUI core nodes our workflows use, copied from ComfyUI's definitions);
- every link type-checks: the source output's type equals the destination input's (``*`` accepts any;
  a union such as ``GIE_VAE,VAE`` accepts each of its types, as ComfyUI's validation does);
- every widget value is in its range or among its choices, every required input is given;
- a UI workflow (litegraph, version 0.4) converts to its API twin exactly as the frontend's
  ``app.graphToPrompt()`` does: widget values in widget order (a seed's ``control_after_generate``
  and LoadImage's ``upload`` take a slot in ``widgets_values`` but are not sent), links as
  ``[source id as string, output slot]``, virtual nodes (notes) and muted/bypassed nodes left out,
  ``_meta.title`` = the node's title or its display name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds control_after_generate to these INTs by name
VIRTUAL_NODES = ("Note", "MarkdownNote")  # frontend-only: never in the API format
MUTED_MODES = (2, 4)  # LGraphEventMode NEVER and BYPASS


@dataclass
class InputSpec:
    name: str
    type: str  # "COMBO" for a list of choices
    options: dict
    required: bool
    choices: list | None = None  # None for a COMBO whose choices are the user's files (LoadImage)

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def has_control_after_generate(self) -> bool:
        if self.type != "INT":
            return False
        return bool(self.options.get("control_after_generate", self.name in SEED_NAMES))


@dataclass
class NodeSpec:
    type: str
    display_name: str
    inputs: list[InputSpec]
    outputs: list[str]
    output_node: bool = False
    # frontend-only widgets following an input's widget: (after input, widget name)
    ui_widgets: list[tuple[str, str]] = field(default_factory=list)

    def input(self, name: str) -> InputSpec | None:
        return next((i for i in self.inputs if i.name == name), None)

    def widget_slots(self) -> list[tuple[str, str]]:
        """``(name, kind)`` per ``widgets_values`` entry; kind is ``value`` (sent to the server),
        ``control`` (control_after_generate) or ``ui`` (frontend-only, e.g. LoadImage's upload)."""
        slots = []
        for i in self.inputs:
            if not i.is_widget:
                continue
            slots.append((i.name, "value"))
            if i.has_control_after_generate:
                slots.append(("control_after_generate", "control"))
            slots.extend((w, "ui") for after, w in self.ui_widgets if after == i.name)
        return slots

    def ui_inputs(self, linked: set[str]) -> list[InputSpec]:
        """The node's ``inputs`` list as the frontend saves it: every socket, and a widget input
        only while a link drives it (unlinked widget slots are compressed away)."""
        return [i for i in self.inputs if not i.is_widget or i.name in linked]


CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def _input(name: str, spec, required: bool) -> InputSpec:
    kind, options = (spec[0], spec[1] if len(spec) > 1 else {})
    if isinstance(kind, (list, tuple)):
        return InputSpec(name, "COMBO", dict(options), required, list(kind))
    if kind == "COMBO":
        return InputSpec(name, "COMBO", dict(options), required, list(options.get("options", [])))
    return InputSpec(name, kind, dict(options), required)


def spec_from_class(node_type: str, cls, display_name: str | None = None) -> NodeSpec:
    """A V1 node class's definition as the frontend reads it from /object_info."""
    types = cls.INPUT_TYPES()
    inputs = [_input(n, s, True) for n, s in types.get("required", {}).items()]
    inputs += [_input(n, s, False) for n, s in types.get("optional", {}).items()]
    return NodeSpec(node_type, display_name or node_type, inputs, list(cls.RETURN_TYPES), bool(getattr(cls, "OUTPUT_NODE", False)))


def _native(node_type, display, inputs, outputs, output_node=False, ui_widgets=()):
    return NodeSpec(node_type, display, [InputSpec(*i) for i in inputs], list(outputs), output_node, list(ui_widgets))


# ComfyUI core nodes the shipped workflows use (nodes.py, comfy_extras/nodes_flux.py,
# nodes_edit_model.py, nodes_primitive.py of ComfyUI 0.3.6x).
NATIVE_NODES: dict[str, NodeSpec] = {
    s.type: s
    for s in (
        _native("LoadImage", "Load Image", [("image", "COMBO", {"image_upload": True}, True, None)], ["IMAGE", "MASK"],
                ui_widgets=[("image", "upload")]),
        _native("SaveImage", "Save Image", [("images", "IMAGE", {}, True), ("filename_prefix", "STRING", {"default": "ComfyUI"}, True)],
                [], output_node=True),
        _native("PreviewImage", "Preview Image", [("images", "IMAGE", {}, True)], [], output_node=True),
        _native("FluxGuidance", "FluxGuidance",
                [("conditioning", "CONDITIONING", {}, True),
                 ("guidance", "FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}, True)],
                ["CONDITIONING"]),
        _native("ReferenceLatent", "ReferenceLatent",
                [("conditioning", "CONDITIONING", {}, True), ("latent", "LATENT", {}, False)], ["CONDITIONING"]),
        _native("PrimitiveStringMultiline", "String (Multiline)",
                [("value", "STRING", {"multiline": True}, True)], ["STRING"]),
        # the native-sampler path (nodes.py, comfy_extras/nodes_model_advanced.py, nodes_sd3.py, nodes_flux.py)
        _native("UNETLoader", "Load Diffusion Model",
                [("unet_name", "COMBO", {}, True, None),
                 ("weight_dtype", "COMBO", {}, True, ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"])],
                ["MODEL"]),
        _native("VAELoader", "Load VAE", [("vae_name", "COMBO", {}, True, None)], ["VAE"]),
        _native("DualCLIPLoader", "DualCLIPLoader",
                [("clip_name1", "COMBO", {}, True, None), ("clip_name2", "COMBO", {}, True, None),
                 ("type", "COMBO", {}, True, ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"]),
                 ("device", "COMBO", {"advanced": True}, False, ["default", "cpu"])],
                ["CLIP"]),
        _native("CLIPTextEncode", "CLIP Text Encode (Prompt)",
                [("text", "STRING", {"multiline": True, "dynamicPrompts": True}, True), ("clip", "CLIP", {}, True)],
                ["CONDITIONING"]),
        _native("ConditioningZeroOut", "ConditioningZeroOut", [("conditioning", "CONDITIONING", {}, True)], ["CONDITIONING"]),
        _native("FluxKontextImageScale", "FluxKontextImageScale", [("image", "IMAGE", {}, True)], ["IMAGE"]),
        _native("VAEEncode", "VAE Encode", [("pixels", "IMAGE", {}, True), ("vae", "VAE", {}, True)], ["LATENT"]),
        _native("VAEDecode", "VAE Decode", [("samples", "LATENT", {}, True), ("vae", "VAE", {}, True)], ["IMAGE"]),
        _native("EmptySD3LatentImage", "EmptySD3LatentImage",
                [("width", "INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}, True),
                 ("height", "INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}, True),
                 ("batch_size", "INT", {"default": 1, "min": 1, "max": 4096}, True)],
                ["LATENT"]),
        _native("ModelSamplingFlux", "ModelSamplingFlux",
                [("model", "MODEL", {}, True),
                 ("max_shift", "FLOAT", {"default": 1.15, "min": 0.0, "max": 100.0, "step": 0.01}, True),
                 ("base_shift", "FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.01}, True),
                 ("width", "INT", {"default": 1024, "min": 16, "max": 16384, "step": 8}, True),
                 ("height", "INT", {"default": 1024, "min": 16, "max": 16384, "step": 8}, True)],
                ["MODEL"]),
        _native("KSampler", "KSampler",
                [("model", "MODEL", {}, True),
                 ("seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}, True),
                 ("steps", "INT", {"default": 20, "min": 1, "max": 10000}, True),
                 ("cfg", "FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}, True),
                 ("sampler_name", "COMBO", {}, True, None), ("scheduler", "COMBO", {}, True, None),
                 ("positive", "CONDITIONING", {}, True), ("negative", "CONDITIONING", {}, True),
                 ("latent_image", "LATENT", {}, True),
                 ("denoise", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}, True)],
                ["LATENT"]),
    )
}


def node_specs(class_mappings: dict, display_names: dict) -> dict[str, NodeSpec]:
    """Our nodes (from the pack's mappings) and the native table, by type."""
    specs = dict(NATIVE_NODES)
    for name, cls in class_mappings.items():
        specs[name] = spec_from_class(name, cls, display_names.get(name, name))
    return specs


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def check_value(spec: InputSpec, value) -> str | None:
    """Why ``value`` is not valid for a widget input, or None."""
    o = spec.options
    if spec.type == "COMBO":
        if spec.choices is None:
            return None if isinstance(value, str) and value else f"{value!r} is not a file name"
        return None if value in spec.choices else f"{value!r} is not one of {spec.choices}"
    if spec.type == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if spec.type == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if spec.type == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not an integer"
    elif spec.type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{value!r} is not a number"
    if "min" in o and value < o["min"]:
        return f"{value!r} is below the minimum {o['min']}"
    if "max" in o and value > o["max"]:
        return f"{value!r} is above the maximum {o['max']}"
    return None


def _types_match(src: str, dst: str) -> bool:
    """As ComfyUI's validate_node_input: equal, ``*``, or overlapping unions ("GIE_VAE,VAE")."""
    if src == dst or "*" in (src, dst):
        return True
    return bool({t.strip() for t in src.split(",")} & {t.strip() for t in dst.split(",")})


# ---------------------------------------------------------------------------------------------
# UI format
# ---------------------------------------------------------------------------------------------


def check_ui(ui: dict, specs: dict[str, NodeSpec]) -> list[str]:
    """Problems of a UI-format workflow (empty when it is valid)."""
    errors: list[str] = []
    if ui.get("version") != 0.4:
        errors.append(f"version is {ui.get('version')!r}, expected 0.4")
    for key in ("last_node_id", "last_link_id", "nodes", "links"):
        if key not in ui:
            errors.append(f"missing '{key}'")
    if errors:
        return errors
    nodes = {n["id"]: n for n in ui["nodes"]}
    if len(nodes) != len(ui["nodes"]):
        errors.append("node ids are not unique")
    if nodes and max(nodes) > ui["last_node_id"]:
        errors.append(f"last_node_id {ui['last_node_id']} is below node id {max(nodes)}")
    links = {}
    for link in ui["links"]:
        if len(link) != 6:
            errors.append(f"link {link} is not [id, src, src_slot, dst, dst_slot, type]")
            continue
        links[link[0]] = link
    if links and max(links) > ui["last_link_id"]:
        errors.append(f"last_link_id {ui['last_link_id']} is below link id {max(links)}")

    for nid, node in nodes.items():
        where = f"node {nid} ({node.get('type')})"
        for key in ("type", "pos", "size", "flags", "order", "mode", "properties"):
            if key not in node:
                errors.append(f"{where}: missing '{key}'")
        t = node.get("type")
        if t in VIRTUAL_NODES:
            continue
        spec = specs.get(t)
        if spec is None:
            errors.append(f"{where}: unknown node type")
            continue
        # widgets
        slots = spec.widget_slots()
        values = node.get("widgets_values", [])
        if not isinstance(values, list) or len(values) != len(slots):
            errors.append(f"{where}: widgets_values has {len(values) if isinstance(values, list) else values!r} "
                          f"entries, the node has {len(slots)} widgets {[s[0] for s in slots]}")
        else:
            for (name, kind), value in zip(slots, values):
                if kind == "value":
                    problem = check_value(spec.input(name), value)
                    if problem:
                        errors.append(f"{where}: widget '{name}' {problem}")
                elif kind == "control" and value not in CONTROL_VALUES:
                    errors.append(f"{where}: control_after_generate {value!r} is not one of {CONTROL_VALUES}")
        # inputs
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        expected = spec.ui_inputs(linked)
        got = node.get("inputs", [])
        if [i["name"] for i in got] != [i.name for i in expected]:
            errors.append(f"{where}: inputs are {[i['name'] for i in got]}, expected {[i.name for i in expected]}")
        for slot, entry in enumerate(got):
            ispec = spec.input(entry["name"])
            if ispec is None:
                errors.append(f"{where}: input '{entry['name']}' does not exist")
                continue
            if entry.get("type") != ispec.type:
                errors.append(f"{where}: input '{entry['name']}' has type {entry.get('type')}, the node says {ispec.type}")
            if ispec.is_widget and entry.get("link") is not None and entry.get("widget", {}).get("name") != ispec.name:
                errors.append(f"{where}: linked widget input '{ispec.name}' lacks widget: {{name: '{ispec.name}'}}")
            lid = entry.get("link")
            if lid is None:
                if ispec.required and not ispec.is_widget:
                    errors.append(f"{where}: required input '{ispec.name}' is not connected")
                continue
            link = links.get(lid)
            if link is None:
                errors.append(f"{where}: input '{ispec.name}' names missing link {lid}")
                continue
            _, src, src_slot, dst, dst_slot, ltype = link
            if dst != nid or dst_slot != slot:
                errors.append(f"{where}: link {lid} targets node {dst} slot {dst_slot}, not this input (slot {slot})")
            if not _types_match(ltype, ispec.type):
                errors.append(f"{where}: link {lid} carries {ltype} into '{ispec.name}' ({ispec.type})")
        # outputs
        outs = node.get("outputs", [])
        if [o.get("type") for o in outs] != spec.outputs:
            errors.append(f"{where}: outputs are {[o.get('type') for o in outs]}, the node returns {spec.outputs}")

    for lid, (_, src, src_slot, dst, dst_slot, ltype) in links.items():
        s, d = nodes.get(src), nodes.get(dst)
        if s is None or d is None:
            errors.append(f"link {lid}: node {src if s is None else dst} does not exist")
            continue
        sspec = specs.get(s["type"])
        if sspec is None:
            continue
        if not 0 <= src_slot < len(sspec.outputs):
            errors.append(f"link {lid}: {s['type']} has no output {src_slot}")
            continue
        if not _types_match(sspec.outputs[src_slot], ltype):
            errors.append(f"link {lid}: {s['type']} output {src_slot} is {sspec.outputs[src_slot]}, the link says {ltype}")
        outs = s.get("outputs", [])
        if src_slot < len(outs) and lid not in (outs[src_slot].get("links") or []):
            errors.append(f"link {lid}: not listed in node {src}'s output {src_slot} links")
        dins = d.get("inputs", [])
        if not (0 <= dst_slot < len(dins) and dins[dst_slot].get("link") == lid):
            errors.append(f"link {lid}: node {dst} input {dst_slot} does not point back to it")
    for nid, node in nodes.items():
        for slot, out in enumerate(node.get("outputs", [])):
            for lid in out.get("links") or []:
                if lid not in links or links[lid][1] != nid or links[lid][2] != slot:
                    errors.append(f"node {nid} output {slot} lists link {lid}, which does not start there")
    return errors


def ui_to_api(ui: dict, specs: dict[str, NodeSpec]) -> dict:
    """The API prompt ``app.graphToPrompt()`` makes of a (valid) UI workflow."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for nid, node in nodes.items():
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in MUTED_MODES:
            continue
        spec = specs[node["type"]]
        inputs = {}
        for (name, kind), value in zip(spec.widget_slots(), node.get("widgets_values", [])):
            if kind == "value":
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), int(link[2])]
        api[str(nid)] = {
            "inputs": inputs,
            "class_type": node["type"],
            "_meta": {"title": node.get("title") or spec.display_name},
        }
    for entry in api.values():  # inputs from left-out nodes are dropped
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in api:
                del entry["inputs"][name]
    return api


# ---------------------------------------------------------------------------------------------
# API format
# ---------------------------------------------------------------------------------------------


def check_api(api: dict, specs: dict[str, NodeSpec]) -> list[str]:
    """Problems of an API-format prompt as the server's validation would see them."""
    errors = []
    for nid, node in api.items():
        t = node.get("class_type")
        where = f"node {nid} ({t})"
        spec = specs.get(t)
        if spec is None:
            errors.append(f"{where}: unknown node type")
            continue
        if "_meta" not in node or "title" not in node["_meta"]:
            errors.append(f"{where}: no _meta.title")
        given = node.get("inputs", {})
        for name in given:
            if spec.input(name) is None:
                errors.append(f"{where}: unknown input '{name}'")
        for ispec in spec.inputs:
            if ispec.name not in given:
                if ispec.required:
                    errors.append(f"{where}: required input '{ispec.name}' is missing")
                continue
            value = given[ispec.name]
            if isinstance(value, list):
                if len(value) != 2 or not isinstance(value[0], str) or not isinstance(value[1], int):
                    errors.append(f"{where}: input '{ispec.name}' link {value} is not [node id string, slot]")
                    continue
                src = api.get(value[0])
                if src is None:
                    errors.append(f"{where}: input '{ispec.name}' links missing node {value[0]}")
                    continue
                sspec = specs.get(src["class_type"])
                if sspec is None:
                    continue
                if not 0 <= value[1] < len(sspec.outputs):
                    errors.append(f"{where}: input '{ispec.name}' links output {value[1]} of {src['class_type']}, which has {len(sspec.outputs)}")
                    continue
                if not _types_match(sspec.outputs[value[1]], ispec.type):
                    errors.append(f"{where}: input '{ispec.name}' ({ispec.type}) gets {sspec.outputs[value[1]]} from node {value[0]}")
            elif not ispec.is_widget:
                errors.append(f"{where}: input '{ispec.name}' ({ispec.type}) must be a link, not {value!r}")
            else:
                problem = check_value(ispec, value)
                if problem:
                    errors.append(f"{where}: input '{ispec.name}' {problem}")
    if not any(specs[n["class_type"]].output_node for n in api.values() if n.get("class_type") in specs):
        errors.append("the prompt has no output node (the server would run nothing)")
    return errors


# ---------------------------------------------------------------------------------------------
# Running an API prompt in process (a minimal stand-in for ComfyUI's executor)
# ---------------------------------------------------------------------------------------------


def execution_order(api: dict) -> list[str]:
    """Node ids with every node after the nodes it takes links from."""
    deps = {nid: {v[0] for v in node["inputs"].values() if isinstance(v, list)} for nid, node in api.items()}
    order: list[str] = []
    while len(order) < len(deps):
        ready = sorted((n for n, d in deps.items() if n not in order and d <= set(order)), key=int)
        if not ready:
            raise ValueError(f"the prompt has a cycle among {sorted(set(deps) - set(order))}")
        order += ready
    return order


def run_prompt(api: dict, classes: dict, natives: dict, *, overrides: dict | None = None, cache: dict | None = None) -> dict:
    """Execute ``api`` node by node: our nodes from ``classes``, native ones from ``natives``
    (``type -> callable(**inputs) -> tuple``). ``overrides`` (``type -> {input: value}``) replaces
    widget values, e.g. fewer steps; ``cache`` keeps outputs of link-free nodes (loaders) between
    prompts as ComfyUI's cache does. Runs under ``torch.inference_mode()`` as ComfyUI's executor
    does. Returns ``{node id: {"result": tuple, "ui": dict | None}}``."""
    import json as _json

    import torch

    with torch.inference_mode():
        return _run(api, classes, natives, overrides or {}, cache, _json)


def _run(api, classes, natives, overrides, cache, _json) -> dict:

    outputs: dict[str, dict] = {}
    for nid in execution_order(api):
        node = api[nid]
        t = node["class_type"]
        inputs = {}
        for name, value in node["inputs"].items():
            inputs[name] = outputs[value[0]]["result"][value[1]] if isinstance(value, list) else value
        inputs.update(overrides.get(t, {}))
        key = None
        if cache is not None and not any(isinstance(v, list) for v in node["inputs"].values()):
            key = (t, _json.dumps(inputs, sort_keys=True, default=str))
        if key is not None and key in cache:
            outputs[nid] = cache[key]
            continue
        if t in classes:
            cls = classes[t]
            out = getattr(cls(), cls.FUNCTION)(**inputs)
        else:
            out = natives[t](**inputs)
        entry = {"result": tuple(out.get("result", ())) if isinstance(out, dict) else tuple(out),
                 "ui": out.get("ui") if isinstance(out, dict) else None}
        outputs[nid] = entry
        if key is not None:
            cache[key] = entry
    return outputs


# ---------------------------------------------------------------------------------------------
# Layout: the size each node is drawn at, as ComfyUI's frontend computes it
# ---------------------------------------------------------------------------------------------

# LiteGraph's constants and LGraphNode.computeSize() of ComfyUI's frontend (comfyui-frontend-package
# 1.27): the title bar sits above ``pos``; the body holds one row per socket (the longer side), then
# each visible widget with a 4 px gap, 8 px under the widgets and a 6 px margin. On load
# (app.loadGraphData) every node is grown to max(saved size, computed size). The browser test
# (tests/test_comfy_server.py) measures the real page against this model.
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT
SLOT_HEIGHT = 20  # LiteGraph.NODE_SLOT_HEIGHT
WIDGET_HEIGHT = 20  # LiteGraph.NODE_WIDGET_HEIGHT
WIDGET_GAP = 4
WIDGETS_PADDING = 8
NODE_MARGIN = 6
MULTILINE_MIN_HEIGHT = 50  # a multiline STRING's text area (DOM widget, --comfy-widget-min-height)
IMAGE_PREVIEW_MIN_HEIGHT = 220  # LoadImage's image preview widget
# Widgets web/gie.js adds (never saved): lines of text, 16 px a line + 8 (the snap preview's two lines; the
# one line of a node that shows its result after a run).
_RESULT_LINE = 1 * 16 + 8
EXTENSION_WIDGETS = {"GIEPadToRatio": 2 * 16 + 8, "GIEPaddingCheck": _RESULT_LINE, "GIERewriteInstruction": _RESULT_LINE,
                     "GIEAnswer": _RESULT_LINE, "GIEConversationTurn": _RESULT_LINE}
VIRTUAL_WIDGETS = {"Note": [MULTILINE_MIN_HEIGHT], "MarkdownNote": [MULTILINE_MIN_HEIGHT]}


def widget_heights(spec: NodeSpec) -> list[int]:
    """The drawn height of each widget of a node (without the gaps)."""
    heights = []
    for name, kind in spec.widget_slots():
        i = spec.input(name) if kind == "value" else None
        multiline = i is not None and i.type == "STRING" and i.options.get("multiline")
        heights.append(MULTILINE_MIN_HEIGHT if multiline else WIDGET_HEIGHT)
    if spec.type == "LoadImage":
        heights.append(IMAGE_PREVIEW_MIN_HEIGHT)
    if spec.type in EXTENSION_WIDGETS:
        heights.append(EXTENSION_WIDGETS[spec.type])
    return heights


def computed_size_height(spec: NodeSpec | None, node_type: str) -> int:
    """The body height (title bar excluded) LGraphNode.computeSize() gives a node."""
    if spec is None:  # a frontend-only node (Note)
        sockets, heights = 1, VIRTUAL_WIDGETS.get(node_type, [])
    else:
        sockets = max(len([i for i in spec.inputs if not i.is_widget]), len(spec.outputs), 1)
        heights = widget_heights(spec)
    body = sockets * SLOT_HEIGHT
    if heights:
        body += sum(h + WIDGET_GAP for h in heights) + WIDGETS_PADDING
    return body + NODE_MARGIN


def rendered_rects(ui: dict, specs: dict[str, NodeSpec]) -> dict[int, tuple[float, float, float, float]]:
    """Per node id, the rectangle (x, y, width, height) it covers on the canvas, title bar included:
    the saved size grown to the computed one, as loading does."""
    rects = {}
    for node in ui["nodes"]:
        x, y = node["pos"][0], node["pos"][1]
        w, h = node["size"][0], node["size"][1]
        h = max(h, computed_size_height(specs.get(node["type"]), node["type"]))
        rects[node["id"]] = (x, y - TITLE_HEIGHT, w, h + TITLE_HEIGHT)
    return rects


def overlaps(rects: dict) -> list[str]:
    """Each pair of rectangles that share area, with the overlap in px."""
    out = []
    items = sorted(rects.items())
    for n, (a, (ax, ay, aw, ah)) in enumerate(items):
        for b, (bx, by, bw, bh) in items[n + 1:]:
            dx = min(ax + aw, bx + bw) - max(ax, bx)
            dy = min(ay + ah, by + bh) - max(ay, by)
            if dx > 0 and dy > 0:
                out.append(f"nodes {a} and {b} overlap by {dx:g} x {dy:g} px")
    return out


def tidy_layout(ui: dict, specs: dict[str, NodeSpec], gap: int = 20) -> dict:
    """``ui`` with every node at least its computed height and pushed down, column by column, until
    none overlaps another (``gap`` px between them); for laying out shipped workflows."""
    placed: list[dict] = []
    for node in sorted(ui["nodes"], key=lambda n: (n["pos"][0], n["pos"][1])):
        node["size"][1] = max(node["size"][1], computed_size_height(specs.get(node["type"]), node["type"]))
        for other in sorted(placed, key=lambda n: n["pos"][1]):
            side_by_side = (node["pos"][0] >= other["pos"][0] + other["size"][0]
                            or other["pos"][0] >= node["pos"][0] + node["size"][0])
            below = other["pos"][1] + other["size"][1] + TITLE_HEIGHT + gap
            if not side_by_side and node["pos"][1] < below and node["pos"][1] + node["size"][1] + gap > other["pos"][1] - TITLE_HEIGHT:
                node["pos"][1] = below
        placed.append(node)
    return ui


def build_ui(nodes: list[dict], links: list[tuple], specs: dict[str, NodeSpec]) -> dict:
    """A UI-format workflow as the frontend saves it, from ``nodes`` (``{"id", "type", "pos",
    "size", "widgets_values"}`` and optionally ``title``, ``color``, ``bgcolor``) and ``links``
    (``(source id, output slot, target id, input name)``); for writing shipped workflows."""
    by_id = {n["id"]: n for n in nodes}
    wired = {}  # (target id, input name) -> (link id, source id, slot, type)
    for lid, (src, slot, dst, name) in enumerate(links, start=1):
        wired[(dst, name)] = (lid, src, slot, specs[by_id[src]["type"]].outputs[slot])
    order = execution_order({str(n["id"]): {"inputs": {name: [str(w[1]), w[2]] for (d, name), w in wired.items()
                                                       if d == n["id"]}} for n in nodes})
    out_nodes, ui_links = [], []
    for n in nodes:
        spec = specs.get(n["type"])
        entry = {"id": n["id"], "type": n["type"], "pos": list(n["pos"]), "size": list(n["size"]), "flags": {},
                 "order": order.index(str(n["id"])), "mode": 0, "inputs": [], "outputs": [],
                 "properties": {} if spec is None else {"Node name for S&R": n["type"]},
                 "widgets_values": list(n.get("widgets_values", []))}
        if spec is not None:
            linked = {name for (d, name) in wired if d == n["id"]}
            for slot, i in enumerate(spec.ui_inputs(linked)):
                w = wired.get((n["id"], i.name))
                item = {"name": i.name, "type": i.type, "link": w[0] if w else None}
                if i.is_widget:
                    item["widget"] = {"name": i.name}
                entry["inputs"].append(item)
                if w:
                    ui_links.append([w[0], w[1], w[2], n["id"], slot, w[3]])
            names = n.get("output_names") or spec.outputs
            for slot, t in enumerate(spec.outputs):
                entry["outputs"].append({"name": names[slot], "type": t, "slot_index": slot,
                                         "links": [w[0] for (d, _), w in wired.items() if w[1] == n["id"] and w[2] == slot]})
        for key in ("title", "color", "bgcolor"):
            if key in n:
                entry[key] = n[key]
        out_nodes.append(entry)
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": out_nodes,
            "links": sorted(ui_links), "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}},
            "version": 0.4}
