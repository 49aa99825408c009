"""Every shipped workflow checked against the node definitions, each UI workflow against its API
twin, the folder layout against what ComfyUI's template browser scans, and each workflow run in
process on the tiny models."""

from __future__ import annotations

import copy
import glob
import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import nodes  # noqa: E402
from nodes import comfy  # noqa: E402
from workflow_check import (  # noqa: E402
    check_api, check_ui, computed_size_height, node_specs, overlaps, rendered_rects, run_prompt, ui_to_api,
)

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "workflows"
API_DIR = TEMPLATES / "api"
WORKFLOWS = (
    "released_model_edit",
    "kontext_t5_baseline",
    "pad_edit_crop",
    "three_turn_edit_chain",
    "connector_modes_side_by_side",
    "released_model_edit_with_rewriting",
    "released_model_native_sampler",
    "released_model_from_single_files",
    "two_image_composition",
    "three_turn_conversation",
)
# ComfyUI's own loaders and KSampler run only in the real server (tests/test_comfy_server.py)
NATIVE_ONLY = ("released_model_native_sampler",)
# The single files of the README's "Models as ComfyUI users keep them", by folder
SINGLE_FILES = {
    "diffusion_models": "gpt-image-edit-kontext-bf16.safetensors",
    "vae": "ae.safetensors",
    "text_encoders": ("clip_l.safetensors", "t5xxl_fp16.safetensors", "gpt-image-edit-qwen2.5-vl-bf16.safetensors"),
    "gie_connectors": "gpt-image-edit-connector.safetensors",
}
# The folder names ComfyUI's server scans for a pack's templates (app/custom_node_manager.py).
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """Node definitions with the model dropdowns a user with the documented folders would see."""
    root = tmp_path_factory.mktemp("wf") / "models"
    (root / "gpt_image_edit" / "gpt-image-edit").mkdir(parents=True)
    (root / "gpt_image_edit" / "gpt-image-edit" / "config.json").write_text("{}")
    (root / "diffusers" / "FLUX.1-Kontext-dev").mkdir(parents=True)
    (root / "diffusers" / "FLUX.1-Kontext-dev" / "model_index.json").write_text("{}")
    for folder, names in SINGLE_FILES.items():
        (root / folder).mkdir()
        for name in (names,) if isinstance(names, str) else names:
            (root / folder / name).write_bytes(b"")
    comfy.set_model_roots({k: [root / k] for k in ("gpt_image_edit", "diffusers", *SINGLE_FILES)})
    yield node_specs(nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)
    comfy.set_model_roots({})


def test_layout_matches_what_the_template_browser_scans():
    """UI workflows sit directly in workflows/ (the project's fixed layout; the server scans it
    for templates, globbing <pack>/<folder>/*.json, not deeper); API twins sit in workflows/api/ so they are not
    listed as (broken) templates. No second template folder: each one found is served at the same
    URL prefix and only the first would answer."""
    pack = REPO.parent
    listed = set()
    for folder in TEMPLATE_FOLDERS:
        for f in glob.glob(os.path.join(str(pack), f"{REPO.name}/{folder}/*.json")):
            listed.add((folder, Path(f).stem))
    assert listed == {("workflows", name) for name in WORKFLOWS}
    assert sorted(p.stem for p in API_DIR.glob("*.json")) == sorted(WORKFLOWS)
    for folder in TEMPLATE_FOLDERS:
        if folder != "workflows":
            assert not (REPO / folder).is_dir() or not list((REPO / folder).glob("*.json")), folder
    for name in WORKFLOWS:
        assert {"nodes", "links", "version"} <= set(load(TEMPLATES / f"{name}.json"))
        assert all("class_type" in n for n in load(API_DIR / f"{name}.json").values())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_valid(name, specs):
    assert check_ui(load(TEMPLATES / f"{name}.json"), specs) == []


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_workflow_is_valid(name, specs):
    assert check_api(load(API_DIR / f"{name}.json"), specs) == []


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_matches_its_api_twin(name, specs):
    assert ui_to_api(load(TEMPLATES / f"{name}.json"), specs) == load(API_DIR / f"{name}.json")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_no_node_hides_another_at_its_drawn_size(name, specs):
    """Every node, drawn at the size ComfyUI's frontend gives it (its widgets, sockets and title bar;
    a saved size smaller than that grows on load), stays clear of every other node, and the file
    saves that size."""
    ui = load(TEMPLATES / f"{name}.json")
    assert overlaps(rendered_rects(ui, specs)) == []
    for node in ui["nodes"]:
        assert node["size"][1] >= computed_size_height(specs.get(node["type"]), node["type"]), node["id"]


def test_drawn_size_counts_every_widget_and_socket(specs):
    """The layout model is not vacuous: the loader whose quantize widgets hid behind the node below
    (shipped sizes before issue 17) is found, and so is a node moved onto another."""
    ui = load(TEMPLATES / "released_model_edit.json")
    by_id = {n["id"]: n for n in ui["nodes"]}
    # GIE Checkpoint Loader: 3 output rows, 5 widgets (20 px + 4 gap each), 8 + 6 px padding
    assert computed_size_height(specs["GIECheckpointLoader"], "GIECheckpointLoader") == 3 * 20 + 5 * 24 + 8 + 6
    # the multiline instruction is a 50 px text area; Load Image carries its 220 px preview
    # (4 socket rows: qwen_vl, image, connector, image_2)
    assert computed_size_height(specs["GIEQwenVLEncode"], "GIEQwenVLEncode") == 4 * 20 + 54 + 8 + 6
    assert computed_size_height(specs["LoadImage"], "LoadImage") == 2 * 20 + 24 + 24 + 224 + 8 + 6
    old = copy.deepcopy(ui)  # the layout shipped before: saved 190 px, drawn 194, next node at y 240
    by_old = {n["id"]: n for n in old["nodes"]}
    by_old[1]["size"][1], by_old[2]["pos"][1] = 190, 240
    assert overlaps(rendered_rects(old, specs)) == ["nodes 1 and 2 overlap by 340 x 24 px"]
    by_id[6]["pos"] = list(by_id[5]["pos"])
    assert any(o.startswith("nodes 5 and 6 overlap") for o in overlaps(rendered_rects(ui, specs)))


def _types(api):
    return [n["class_type"] for n in api.values()]


def test_workflows_do_what_their_names_say():
    api = {name: load(API_DIR / f"{name}.json") for name in WORKFLOWS}
    released = api["released_model_edit"]
    assert {"GIECheckpointLoader", "GIEQwenVLEncode", "GIET5Encode", "GIEFusionConnector", "GIEKontextSampler",
            "LoadImage", "SaveImage"} <= set(_types(released))
    assert [n["inputs"]["mode"] for n in released.values() if n["class_type"] == "GIEFusionConnector"] == ["vlm+t5"]
    base = api["kontext_t5_baseline"]
    assert "GIECheckpointLoader" not in _types(base) and "GIEFusionConnector" not in _types(base)
    sampler = next(n for n in base.values() if n["class_type"] == "GIEKontextSampler")
    assert base[sampler["inputs"]["positive"][0]]["class_type"] == "GIET5Encode" and sampler["inputs"]["positive"][1] == 1
    assert {"GIEPadToRatio", "GIECropPadding", "GIEPaddingCheck"} <= set(_types(api["pad_edit_crop"]))
    chain = api["three_turn_edit_chain"]
    samplers = {nid: n for nid, n in chain.items() if n["class_type"] == "GIEKontextSampler"}
    assert len(samplers) == 3
    fed_by_sampler = [nid for nid, n in samplers.items() if n["inputs"]["image"][0] in samplers]
    assert len(fed_by_sampler) == 2  # turns 2 and 3 edit the previous result
    modes = sorted(n["inputs"]["mode"] for n in api["connector_modes_side_by_side"].values()
                   if n["class_type"] == "GIEFusionConnector")
    assert modes == ["t5", "vlm", "vlm+t5"]
    rw = api["released_model_edit_with_rewriting"]
    rid = next(nid for nid, n in rw.items() if n["class_type"] == "GIERewriteInstruction")
    encoders = [n for n in rw.values() if n["class_type"] in ("GIEQwenVLEncode", "GIET5Encode")]
    assert len(encoders) == 2 and all(n["inputs"]["instruction"] == [rid, 0] for n in encoders)
    native = api["released_model_native_sampler"]  # converted files, native loaders and KSampler
    assert {"UNETLoader", "VAELoader", "ModelSamplingFlux", "ReferenceLatent", "FluxGuidance", "KSampler",
            "GIEFusionConnector", "GIEQwenVLLoader", "GIEConnectorLoader"} <= set(_types(native))
    ks = next(n for n in native.values() if n["class_type"] == "KSampler")["inputs"]
    assert (ks["sampler_name"], ks["scheduler"], ks["cfg"], ks["steps"]) == ("euler", "simple", 1.0, 28)
    singles = api["released_model_from_single_files"]  # our sampler, every model from ComfyUI's folders
    assert {"GIEKontextModelLoader", "GIEVAELoader", "GIETextEncodersLoader", "GIEQwenVLLoader", "GIEConnectorLoader",
            "GIEKontextSampler"} <= set(_types(singles))
    assert not {"GIECheckpointLoader", "GIEKontextDiffusersLoader"} & set(_types(singles))
    two = api["two_image_composition"]  # Image 1 and Image 2 reach Qwen and Kontext
    loads = sorted(nid for nid, n in two.items() if n["class_type"] == "LoadImage")
    for cls in ("GIEQwenVLEncode", "GIEKontextSampler"):
        (n,) = [n for n in two.values() if n["class_type"] == cls]
        assert [n["inputs"]["image"][0], n["inputs"]["image_2"][0]] == loads
    chat = api["three_turn_conversation"]  # edit, question, edit: each turn continues the previous one
    turns = sorted((nid for nid, n in chat.items() if n["class_type"] in ("GIEConversationTurn", "GIEAnswer")), key=int)
    assert [chat[t]["class_type"] for t in turns] == ["GIEConversationTurn", "GIEAnswer", "GIEConversationTurn"]
    assert all(chat[b]["inputs"]["conversation"] == [a, 1] for a, b in itertools.pairwise(turns))
    samplers = {nid: n for nid, n in chat.items() if n["class_type"] == "GIEKontextSampler"}
    assert sorted(n["inputs"]["positive"][0] for n in samplers.values()) == [turns[0], turns[2]]
    assert all("image" not in n["inputs"] for n in samplers.values())  # the turn carries every image
    assert chat[turns[1]]["inputs"]["previous_result"][0] in samplers  # turn 1's image joins before the question
    for a in api.values():  # the names a user has, per the README
        for n in a.values():
            if n["class_type"] == "GIECheckpointLoader":
                assert n["inputs"]["checkpoint"] == "gpt-image-edit"
            if n["class_type"] == "GIEKontextDiffusersLoader":
                assert n["inputs"]["kontext"] == "FLUX.1-Kontext-dev"
            if n["class_type"] == "LoadImage":
                assert n["inputs"]["image"] == "example.png"
            for key in ("model_name", "unet_name", "vae_name", "qwen_name", "connector_name", "clip_name", "t5_name"):
                if key in n["inputs"]:
                    name = n["inputs"][key]
                    assert any(name == f or name in f for f in SINGLE_FILES.values()), (key, name)


def test_seed_widgets_carry_control_after_generate(specs):
    ui = load(TEMPLATES / "released_model_edit.json")
    node = next(n for n in ui["nodes"] if n["type"] == "GIEKontextSampler")
    names = [s[0] for s in specs["GIEKontextSampler"].widget_slots()]
    assert names[:2] == ["seed", "control_after_generate"] and node["widgets_values"][1] == "fixed"
    api = ui_to_api(ui, specs)
    assert "control_after_generate" not in api[str(node["id"])]["inputs"]
    load_image = next(n for n in ui["nodes"] if n["type"] == "LoadImage")
    assert load_image["widgets_values"] == ["example.png", "image"]
    assert api[str(load_image["id"])]["inputs"] == {"image": "example.png"}


def test_checker_finds_broken_workflows(specs):
    """The checks are not vacuous: each kind of mistake is reported."""
    ui = load(TEMPLATES / "released_model_edit.json")
    api = load(API_DIR / "released_model_edit.json")

    def ui_errors(edit):
        broken = copy.deepcopy(ui)
        edit(broken)
        return "\n".join(check_ui(broken, specs))

    def node(wf, t):
        return next(n for n in wf["nodes"] if n["type"] == t)

    assert "unknown node type" in ui_errors(lambda w: node(w, "SaveImage").update(type="SaveImageX"))
    assert "above the maximum" in ui_errors(lambda w: node(w, "GIEKontextSampler")["widgets_values"].__setitem__(2, 500))
    assert "not one of" in ui_errors(lambda w: node(w, "GIEFusionConnector")["widgets_values"].__setitem__(0, "vlm+clip"))
    assert "not one of" in ui_errors(lambda w: node(w, "GIECheckpointLoader")["widgets_values"].__setitem__(0, "missing"))
    assert "widgets_values has" in ui_errors(lambda w: node(w, "GIEKontextSampler")["widgets_values"].pop(1))

    def retype(w):
        link = next(l for l in w["links"] if l[5] == "GIE_VAE")
        link[5] = "LATENT"

    assert "carries LATENT" in ui_errors(retype)

    def miswire(w):  # the Qwen encoder's output into the sampler's vae input
        link = next(l for l in w["links"] if l[5] == "GIE_VAE")
        q = node(w, "GIEQwenVLEncode")
        link[1], link[2], link[5] = q["id"], 0, "GIE_VAE"
        q["outputs"][0]["links"].append(link[0])

    assert "is GIE_QWEN_FEATURES, the link says GIE_VAE" in ui_errors(miswire)

    def unplug(w):
        s = node(w, "GIEKontextSampler")
        lid = s["inputs"][0]["link"]
        s["inputs"][0]["link"] = None
        w["links"] = [l for l in w["links"] if l[0] != lid]
        for n in w["nodes"]:
            for o in n.get("outputs", []):
                o["links"] = [x for x in o["links"] or [] if x != lid]

    assert "required input 'kontext_model' is not connected" in ui_errors(unplug)

    broken_api = copy.deepcopy(api)
    sid = next(k for k, n in broken_api.items() if n["class_type"] == "GIEKontextSampler")
    del broken_api[sid]["inputs"]["vae"]
    broken_api[sid]["inputs"]["steps"] = 0
    errors = "\n".join(check_api(broken_api, specs))
    assert "required input 'vae' is missing" in errors and "below the minimum" in errors
    twin = copy.deepcopy(ui)
    node(twin, "GIEKontextSampler")["widgets_values"][0] = 7
    assert ui_to_api(twin, specs) != api


# ---------------------------------------------------------------------------------------------
# Each workflow runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runnable(tiny_set, tmp_path_factory):
    """The workflows' model names pointing at the tiny models."""
    root = tmp_path_factory.mktemp("wf-run") / "models"
    (root / "gpt_image_edit").mkdir(parents=True)
    (root / "diffusers").mkdir(parents=True)
    (root / "gpt_image_edit" / "gpt-image-edit").symlink_to(tiny_set.gie_dir)
    (root / "diffusers" / "FLUX.1-Kontext-dev").symlink_to(tiny_set.kontext_dir)
    _single_files(tiny_set, root)
    comfy.set_model_roots({k: [root / k] for k in ("gpt_image_edit", "diffusers", *SINGLE_FILES)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(comfy, "torch_device", lambda: torch.device("cpu"))
        yield {}
    comfy.set_model_roots({})


def _single_files(tiny_set, root: Path) -> None:
    """The tiny models under the single-file names the workflows use: gie-convert's files and the
    Kontext VAE / CLIP / T5 in their ComfyUI layouts."""
    import bfl_layout
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    from gie_core.weights.convert import convert

    written = convert(tiny_set.gie_dir, root / "converted")
    for part, folder in (("transformer", "diffusion_models"), ("qwen", "text_encoders"), ("connector", "gie_connectors")):
        (root / folder).mkdir(exist_ok=True)
        names = SINGLE_FILES[folder]
        name = names if isinstance(names, str) else next(n for n in names if "qwen" in n)
        written[part].rename(root / folder / name)
    (root / "vae").mkdir(exist_ok=True)
    vae = AutoencoderKL.from_pretrained(tiny_set.kontext_dir / "vae").state_dict()
    bfl_layout.save(bfl_layout.vae_diffusers_to_ldm(vae), root / "vae" / SINGLE_FILES["vae"])
    clip = CLIPTextModel.from_pretrained(tiny_set.kontext_dir / "text_encoder").state_dict()
    clip = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip.items()}
    bfl_layout.save(clip, root / "text_encoders" / "clip_l.safetensors")
    bfl_layout.save(T5EncoderModel.from_pretrained(tiny_set.kontext_dir / "text_encoder_2").state_dict(),
                    root / "text_encoders" / "t5xxl_fp16.safetensors")


NATIVES = {
    "LoadImage": lambda image: (torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 40, 56)),
    "SaveImage": lambda images, filename_prefix: {"ui": {"images": [filename_prefix]}, "result": ()},
    "PrimitiveStringMultiline": lambda value: (value,),
}
# Quick settings for the tiny models (the shipped values are the published ones: 28 steps, ~1 MP).
QUICK = {
    "GIECheckpointLoader": {"dtype": "fp32"},
    "GIEKontextDiffusersLoader": {"dtype": "fp32"},
    "GIEKontextModelLoader": {"dtype": "fp32"},
    "GIEVAELoader": {"dtype": "fp32"},
    "GIETextEncodersLoader": {"dtype": "fp32", "tokenizers": "FLUX.1-Kontext-dev"},  # no ComfyUI: no bundled copy
    "GIEQwenVLLoader": {"dtype": "fp32", "tokenizer": "gpt-image-edit"},
    "GIEConnectorLoader": {"dtype": "fp32"},
    "GIEKontextSampler": {"steps": 1, "width": 48, "height": 0, "reference_resize": "keep"},
    "GIERewriteInstruction": {"max_new_tokens": 16},
    "GIEConversationTurn": {"reference_resize": "keep", "max_new_tokens": 8},
    "GIEAnswer": {"max_new_tokens": 8},
}


@pytest.mark.parametrize("name", [w for w in WORKFLOWS if w not in NATIVE_ONLY])
def test_workflow_runs_in_process(name, runnable):
    api = load(API_DIR / f"{name}.json")
    out = run_prompt(api, nodes.NODE_CLASS_MAPPINGS, NATIVES, overrides=QUICK, cache=runnable)
    for nid, node in api.items():
        if node["class_type"] == "GIEKontextSampler":
            (img,) = out[nid]["result"]
            assert img.shape[0] == 1 and img.shape[-1] == 3 and 0 <= img.min() and img.max() <= 1
        if node["class_type"] == "GIECropPadding":
            assert out[nid]["result"][0].shape == (1, 40, 56, 3)  # back to the input's size
        if node["class_type"] == "GIEPaddingCheck":
            assert isinstance(out[nid]["result"][0], float) and out[nid]["ui"]["text"]
        if node["class_type"] == "GIEAnswer":  # the answer is text, shown on the node, and joins the conversation
            text, conv = out[nid]["result"]
            assert isinstance(text, str) and out[nid]["ui"]["text"] == [text] and conv.turns[-1].text == text
        if node["class_type"] == "GIEConversationTurn":  # every image so far is a reference of the edit
            cond, conv = out[nid]["result"][:2]
            assert conv.pending and len(cond[0][1]["reference_latents"]) == len(conv.images())
    if name == "three_turn_conversation":
        last = max((nid for nid, n in api.items() if n["class_type"] == "GIEConversationTurn"), key=int)
        conv = out[last]["result"][1]
        assert [t.role for t in conv.turns] == ["user", "assistant"] * 2 + ["user"] and len(conv.images()) == 2
    saved = [nid for nid, n in api.items() if n["class_type"] == "SaveImage"]
    assert saved and all(out[nid]["ui"]["images"] for nid in saved)
