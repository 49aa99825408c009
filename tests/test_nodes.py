"""The ComfyUI nodes without ComfyUI: every node's contract, and every node run in-process on the
tiny model set, returning ComfyUI types (IMAGE [B, H, W, 3] in 0..1, MASK [B, H, W],
CONDITIONING lists) that match the engine's own results."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import bfl_layout  # noqa: E402
import nodes  # noqa: E402
from gie_core.engine.components import Placement  # noqa: E402
from gie_core.engine.connector import QwenFeatures, TextFeatures  # noqa: E402
from gie_core.engine.conversation import Conversation  # noqa: E402
from gie_core.imaging.ratio import PadRecord  # noqa: E402
from gie_core.engine.sampler import SamplingInterrupted  # noqa: E402
from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N = NODE_CLASS_MAPPINGS
INSTRUCTION = "make the sky a warm sunset"
CUSTOM_TYPES = {"GIE_QWEN_VL", "GIE_CONNECTOR", "GIE_KONTEXT", "GIE_VAE", "GIE_TEXT_ENCODERS", "GIE_QWEN_FEATURES",
                "GIE_TEXT_FEATURES", "GIE_PAD_RECORD", "GIE_CONVERSATION", "GIE_TASK_HEAD"}
COMFY_TYPES = {"IMAGE", "MASK", "CONDITIONING", "LATENT"}
NATIVE_OBJECTS = {"VAE", "CLIP"}  # ComfyUI's own loaders' outputs, taken where ours are
_real_torch_device = comfy.torch_device  # module fixtures pin the device to the CPU


# ---------------------------------------------------------------------------------------------
# Fixtures: a models/ tree as ComfyUI keeps it, filled with the tiny models
# ---------------------------------------------------------------------------------------------


def _tiny_lora(kontext_dir: Path, out_dir: Path) -> Path:
    from gie_core.testing.tiny import build_tiny_lora

    return build_tiny_lora(kontext_dir, out_dir)


def _single_files(kontext_dir: Path, root: Path) -> None:
    """The tiny Kontext parts as the single files ComfyUI users keep (BFL transformer, LDM VAE, clip_l, t5xxl)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    sd = FluxTransformer2DModel.from_pretrained(kontext_dir / "transformer").state_dict()
    bfl_layout.save(bfl_layout.flux_diffusers_to_bfl(sd), root / "diffusion_models" / "kontext_tiny.safetensors")
    vae = AutoencoderKL.from_pretrained(kontext_dir / "vae").state_dict()
    bfl_layout.save(bfl_layout.vae_diffusers_to_ldm(vae), root / "vae" / "ae_tiny.safetensors")
    clip = CLIPTextModel.from_pretrained(kontext_dir / "text_encoder").state_dict()
    clip = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip.items()}
    bfl_layout.save(clip, root / "text_encoders" / "clip_l_tiny.safetensors")
    t5 = T5EncoderModel.from_pretrained(kontext_dir / "text_encoder_2").state_dict()
    bfl_layout.save(t5, root / "text_encoders" / "t5xxl_tiny.safetensors")


@pytest.fixture(scope="module")
def models_root(tiny_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy") / "models"
    kinds = ("gpt_image_edit", "diffusers", "loras", "diffusion_models", "vae", "text_encoders", "gie_connectors")
    for k in kinds:
        (root / k).mkdir(parents=True)
    (root / "gpt_image_edit" / "gpt-image-edit").symlink_to(tiny_set.gie_dir)
    (root / "diffusers" / "FLUX.1-Kontext-dev").symlink_to(tiny_set.kontext_dir)
    _tiny_lora(tiny_set.kontext_dir, root / "loras")
    _single_files(tiny_set.kontext_dir, root)
    from gie_core.weights.convert import convert

    # gie-convert's files, as a user converting the released checkpoint would place them
    convert(tiny_set.gie_dir, root, parts=("qwen", "connector"), qwen_format="fp32", lm_head=True, name="gie-tiny")
    comfy.set_model_roots({k: [root / k] for k in kinds})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(comfy, "torch_device", lambda: torch.device("cpu"))  # results compared with CPU runs
        yield root
    comfy.set_model_roots({})


@pytest.fixture(scope="module")
def loaded(models_root):
    """Loader outputs: the GPT-Image-Edit parts and the stock Kontext parts (fp32, kept on the device)."""
    qwen, connector, gie_kontext = N["GIECheckpointLoader"]().load("gpt-image-edit", "fp32", "none")
    kontext, vae, text = N["GIEKontextDiffusersLoader"]().load("FLUX.1-Kontext-dev", True, True, "fp32", "none")
    return types.SimpleNamespace(qwen=qwen, connector=connector, gie_kontext=gie_kontext, kontext=kontext, vae=vae, text=text)


def image(width=64, height=48, batch=1, seed=0) -> torch.Tensor:
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def run_sampler(model, vae, positive, img, *, seed=3, steps=2, guidance=3.5, width=64, height=48, batch_size=1,
                resize="keep", unload_after=False, **optional):
    (out,) = N["GIEKontextSampler"]().sample(model, vae, positive, img, seed, steps, guidance, width, height,
                                              batch_size, resize, unload_after, **optional)
    return out


def fused(loaded, img, mode="vlm+t5", instruction=INSTRUCTION):
    (qf,) = N["GIEQwenVLEncode"]().encode(loaded.qwen, img, instruction)
    tf, _ = N["GIET5Encode"]().encode(loaded.text, instruction)
    (cond,) = N["GIEFusionConnector"]().fuse(loaded.connector, tf, mode, qf)
    return cond


def assert_image(t: torch.Tensor, batch: int, height: int, width: int) -> None:
    assert t.shape == (batch, height, width, 3)
    assert t.dtype == torch.float32 and t.device.type == "cpu"
    assert 0.0 <= t.min().item() and t.max().item() <= 1.0


# ---------------------------------------------------------------------------------------------
# Contracts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(N))
def test_node_contract(name, models_root):
    """What ComfyUI and its frontend read from a node: inputs with defaults, ranges or choices and
    tooltips; outputs with names and tooltips; a description, category and help page."""
    cls = N[name]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec.get("required")
    for section in ("required", "optional"):
        for inp, entry in spec.get(section, {}).items():
            where = f"{name}.{inp}"
            assert isinstance(entry, tuple) and len(entry) == 2, where
            kind, opts = entry
            assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 10, f"{where} has no tooltip"
            if isinstance(kind, list):
                assert kind and all(isinstance(c, str) for c in kind), f"{where} has no choices"
                assert opts.get("default", kind[0]) in kind, where
            elif kind in ("INT", "FLOAT"):
                assert {"default", "min", "max"} <= set(opts), where
                assert opts["min"] <= opts["default"] <= opts["max"], where
                if kind == "INT":
                    assert all(isinstance(opts[k], int) for k in ("default", "min", "max")), where
            elif kind == "BOOLEAN":
                assert isinstance(opts.get("default"), bool), where
            elif kind == "STRING":
                assert isinstance(opts.get("default"), str), where
            else:  # a union ("GIE_VAE,VAE") takes ours or ComfyUI's own object
                assert set(kind.split(",")) <= CUSTOM_TYPES | COMFY_TYPES | NATIVE_OBJECTS, f"{where}: unexpected type {kind}"
            if inp == "seed":
                assert kind == "INT" and opts["max"] == 2**64 - 1 and opts.get("control_after_generate") is True
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert all(t in CUSTOM_TYPES | COMFY_TYPES | {"STRING", "FLOAT", "BOOLEAN", "INT"} for t in cls.RETURN_TYPES)
    fn = getattr(cls, cls.FUNCTION)
    params = inspect.signature(fn).parameters
    required, optional = set(spec["required"]), set(spec.get("optional", {}))
    assert set(params) - {"self"} == required | optional
    assert all(params[p].default is not inspect.Parameter.empty for p in optional)
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    assert cls.CATEGORY.startswith("GPT-Image-Edit")
    assert NODE_DISPLAY_NAME_MAPPINGS[name]
    help_page = REPO / "web" / "docs" / f"{name}.md"
    assert help_page.is_file(), f"no help page {help_page}"
    text = help_page.read_text()
    for word in [*required, *optional, *cls.RETURN_NAMES]:
        assert f"`{word}`" in text, f"{help_page.name} does not document `{word}`"


def test_pack_entry_point_exports_the_nodes_and_web_directory():
    """ComfyUI imports the repository folder as a package; it must export the mappings and ./web."""
    spec = importlib.util.spec_from_file_location("gie_pack_under_test", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    try:
        spec.loader.exec_module(pack)
    finally:
        sys.modules.pop(spec.name, None)
    assert pack.WEB_DIRECTORY == "./web" and (REPO / "web").is_dir()
    assert set(pack.NODE_CLASS_MAPPINGS) == set(N) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert len(N) == 19


def test_only_nodes_comfy_imports_comfyui():
    """ComfyUI modules are imported in nodes/comfy.py only (everything else imports without ComfyUI)."""
    comfy_modules = {"folder_paths", "comfy", "comfy_extras", "comfy_api", "server", "execution", "node_helpers"}
    for path in sorted((REPO / "nodes").glob("*.py")):
        if path.name == "comfy.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] in comfy_modules for n in names), f"{path.name} imports {names}"
    for path in sorted((REPO / "gie_core").rglob("*.py")):
        assert "folder_paths" not in path.read_text() and "comfy.model_management" not in path.read_text(), path


def test_fallbacks_without_comfyui(models_root, tmp_path):
    assert comfy.folder_paths() is None and comfy.model_management() is None
    assert comfy.list_model_dirs("gpt_image_edit") == ["gpt-image-edit"]
    # nested folders (models/diffusers/<org>/<name>) are found; folders without the marker are not
    for rel in ("b/FLUX.1-Kontext-dev", "a", "c/d/too-deep", "e"):
        (tmp_path / rel).mkdir(parents=True)
    for rel in ("b/FLUX.1-Kontext-dev", "a", "c/d/too-deep"):
        (tmp_path / rel / "model_index.json").write_text("{}")
    comfy.set_model_roots({"diffusers": [tmp_path]})
    assert comfy.list_model_dirs("diffusers") == ["a", "b/FLUX.1-Kontext-dev"]
    assert comfy.resolve_model_dir("diffusers", "b/FLUX.1-Kontext-dev") == tmp_path / "b" / "FLUX.1-Kontext-dev"
    comfy.set_model_roots({k: [models_root / k] for k in
                           ("gpt_image_edit", "diffusers", "loras", "diffusion_models", "vae", "text_encoders")})
    assert comfy.list_model_dirs("diffusers") == ["FLUX.1-Kontext-dev"]
    assert comfy.list_model_files("loras") == ["tiny_lora.safetensors"]
    assert N["GIECheckpointLoader"].INPUT_TYPES()["required"]["checkpoint"][0] == ["gpt-image-edit"]
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        comfy.resolve_model_dir("diffusers", "../gpt_image_edit/gpt-image-edit")
    with pytest.raises(FileNotFoundError, match="not a file in models/loras"):
        comfy.resolve_model_file("loras", "missing.safetensors")
    from gie_core.engine.request import resolve_device

    assert _real_torch_device() == resolve_device(None)


# ---------------------------------------------------------------------------------------------
# Nodes in process
# ---------------------------------------------------------------------------------------------


def test_loaders_return_our_types(loaded):
    from gie_core.engine.components import KontextModel, PlacedModel

    assert isinstance(loaded.gie_kontext, KontextModel) and loaded.gie_kontext.transformer is not None
    assert isinstance(loaded.qwen, PlacedModel) and isinstance(loaded.connector, PlacedModel)
    assert loaded.text.model.t5 is not None and loaded.text.model.clip is not None
    # the released checkpoint's transformer is the fine-tune, not the stock one
    a = dict(loaded.gie_kontext.transformer.named_parameters())["x_embedder.weight"]
    b = dict(loaded.kontext.transformer.named_parameters())["x_embedder.weight"]
    assert not torch.equal(a, b)
    skipped, _, no_t5 = N["GIEKontextDiffusersLoader"]().load("FLUX.1-Kontext-dev", False, False, "fp32", "model")
    assert skipped.transformer is None and no_t5.model.t5 is None
    with pytest.raises(ValueError, match="load_transformer"):
        run_sampler(skipped, loaded.vae, fused(loaded, image()), image())


def test_encoders_and_connector_give_comfy_conditioning(loaded):
    img = image(batch=2)
    (qf,) = N["GIEQwenVLEncode"]().encode(loaded.qwen, img, INSTRUCTION)
    assert isinstance(qf, QwenFeatures) and qf.hidden.shape[0] == 2 and qf.hidden.device.type == "cpu"
    tf, cond = N["GIET5Encode"]().encode(loaded.text, INSTRUCTION)
    assert isinstance(tf, TextFeatures) and tf.t5.shape == (1, 256, 32) and tf.pooled.shape == (1, 64)
    # native CONDITIONING: [[tokens [B, L, D], {"pooled_output": [B, P]}]]
    assert isinstance(cond, list) and len(cond) == 1 and torch.equal(cond[0][0], tf.t5)
    assert torch.equal(cond[0][1]["pooled_output"], tf.pooled)
    lengths = {}
    for mode in ("vlm", "vlm+t5", "t5"):
        (c,) = N["GIEFusionConnector"]().fuse(loaded.connector, tf, mode, qf)
        assert isinstance(c, list) and len(c) == 1 and isinstance(c[0][1], dict)
        tokens, pooled = c[0][0], c[0][1]["pooled_output"]
        assert tokens.ndim == 3 and tokens.shape[-1] == 32 and pooled.shape[-1] == 64
        lengths[mode] = tokens.shape[1]
    assert lengths["vlm+t5"] == lengths["vlm"] + 256 and lengths["t5"] == 256
    (c,) = N["GIEFusionConnector"]().fuse(loaded.connector, tf, "t5")  # t5 needs no Qwen features
    assert torch.equal(c[0][0], tf.t5)


def test_node_chain_equals_the_engine_pipeline(loaded, tiny_set):
    """Qwen-VL Encode + T5 Encode + Fusion Connector + Kontext Sampler == EditPipeline.edit."""
    from gie_core.engine.pipeline import EditPipeline

    img = image()
    ours = run_sampler(loaded.gie_kontext, loaded.vae, fused(loaded, img), img, seed=5)
    assert_image(ours, 1, 48, 64)
    pipe = EditPipeline.from_paths(gie_dir=tiny_set.gie_dir, kontext_dir=tiny_set.kontext_dir, mode="vlm+t5",
                                   dtype="fp32", device="cpu")
    ref = pipe.edit(img, INSTRUCTION, mode="vlm+t5", steps=2, seed=5, size=(64, 48), reference_resize="keep").tensor
    assert (ours - ref).abs().max().item() <= 1e-6


def test_native_flux_conditioning_drives_our_sampler(loaded):
    """A native-style Flux CONDITIONING (T5 tokens, pooled_output, FluxGuidance's guidance key)
    feeds the sampler; the guidance key wins over the widget. (ReferenceLatent: see
    test_native_reference_latents_are_kontext_references_and_combine_is_refused.)"""
    img = image()
    tf, ours = N["GIET5Encode"]().encode(loaded.text, INSTRUCTION)
    native = [[tf.t5.clone(), {"pooled_output": tf.pooled.clone(), "guidance": 2.0}]]
    out = run_sampler(loaded.kontext, loaded.vae, native, img, guidance=3.5)
    same = run_sampler(loaded.kontext, loaded.vae, ours, img, guidance=2.0)
    other = run_sampler(loaded.kontext, loaded.vae, ours, img, guidance=3.5)
    assert_image(out, 1, 48, 64)
    assert torch.equal(out, same)
    assert (out - other).abs().max() > 1e-4


def test_sampler_batches_sizes_and_true_cfg(loaded):
    cond = fused(loaded, image())
    out = run_sampler(loaded.gie_kontext, loaded.vae, cond, image(), batch_size=2, width=32, height=48)
    assert_image(out, 2, 48, 32)
    assert (out[0] - out[1]).abs().max() > 1e-3
    refs = image(batch=3)
    (qf,) = N["GIEQwenVLEncode"]().encode(loaded.qwen, refs, INSTRUCTION)
    tf, _ = N["GIET5Encode"]().encode(loaded.text, INSTRUCTION)
    (cond3,) = N["GIEFusionConnector"]().fuse(loaded.connector, tf, "vlm+t5", qf)
    assert_image(run_sampler(loaded.gie_kontext, loaded.vae, cond3, refs), 3, 48, 64)
    _, neg = N["GIET5Encode"]().encode(loaded.text, "blurry")
    cfg = run_sampler(loaded.gie_kontext, loaded.vae, cond, image(), negative=neg, true_cfg=2.0)
    plain = run_sampler(loaded.gie_kontext, loaded.vae, cond, image(), negative=neg, true_cfg=1.0)
    assert (cfg - plain).abs().max() > 1e-4
    assert torch.equal(plain, run_sampler(loaded.gie_kontext, loaded.vae, cond, image()))


def test_output_size_auto_and_multiples_of_16():
    from nodes.sampling import output_size

    assert output_size(0, 0, 640, 480) == (1168, 880)  # ~1 MP at 4:3
    assert output_size(512, 0, 640, 480) == (512, 384)
    assert output_size(0, 512, 480, 640) == (384, 512)
    assert output_size(1024, 768, 10, 10) == (1024, 768)
    with pytest.raises(ValueError, match="multiple of 16"):
        output_size(1000, 512, 640, 480)


def test_validation_errors_name_the_input(loaded):
    img = image()
    cond = fused(loaded, img)
    with pytest.raises(ValueError, match="instruction is empty"):
        N["GIEQwenVLEncode"]().encode(loaded.qwen, img, "   ")
    with pytest.raises(ValueError, match="instruction is empty"):
        N["GIET5Encode"]().encode(loaded.text, "")
    with pytest.raises(ValueError, match="instruction is empty"):
        N["GIERewriteInstruction"]().rewrite(loaded.qwen, img, "", 16, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match=r"image has shape \[1, 48, 64, 4\].*\[batch, height, width, 3\]"):
        N["GIEQwenVLEncode"]().encode(loaded.qwen, torch.rand(1, 48, 64, 4), INSTRUCTION)
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\]"):
        run_sampler(loaded.gie_kontext, loaded.vae, cond, torch.rand(48, 64, 3))
    with pytest.raises(ValueError, match="at least 16 px"):
        N["GIEPadToRatio"]().pad(torch.rand(1, 8, 64, 3), "default", "white", "center")
    # mismatched batch sizes
    (qf2,) = N["GIEQwenVLEncode"]().encode(loaded.qwen, image(batch=2), INSTRUCTION)
    tf, _ = N["GIET5Encode"]().encode(loaded.text, INSTRUCTION)
    (cond2,) = N["GIEFusionConnector"]().fuse(loaded.connector, tf, "vlm+t5", qf2)
    with pytest.raises(ValueError, match="positive conditioning has batch 2 but 3 images"):
        run_sampler(loaded.gie_kontext, loaded.vae, cond2, image(batch=3))
    with pytest.raises(ValueError, match="batch of 2 but batch size is 3"):
        run_sampler(loaded.gie_kontext, loaded.vae, cond, image(batch=2), batch_size=3)
    # conditioning of another model family, missing pieces
    with pytest.raises(ValueError, match="4096-wide tokens"):
        run_sampler(loaded.gie_kontext, loaded.vae, [[torch.zeros(1, 8, 4096), {"pooled_output": torch.zeros(1, 64)}]], img)
    with pytest.raises(ValueError, match="pooled_output"):
        run_sampler(loaded.gie_kontext, loaded.vae, [[torch.zeros(1, 8, 32), {}]], img)
    with pytest.raises(ValueError, match="no negative conditioning"):
        run_sampler(loaded.gie_kontext, loaded.vae, cond, img, true_cfg=3.0)
    with pytest.raises(ValueError, match="needs qwen_features"):
        N["GIEFusionConnector"]().fuse(loaded.connector, tf, "vlm+t5")
    with pytest.raises(ValueError, match="positive conditioning is empty"):
        run_sampler(loaded.gie_kontext, loaded.vae, None, img)
    with pytest.raises(ValueError, match="kontext_model is not connected"):
        run_sampler(None, loaded.vae, cond, img)


def test_pad_crop_and_padding_check():
    img = image(width=70, height=40, batch=2)
    padded, record, mask = N["GIEPadToRatio"]().pad(img, "default", "white", "center")
    assert isinstance(record, PadRecord) and record.ratio == (3, 2)
    assert_image(padded, 2, 48, 72)
    assert mask.shape == (2, 48, 72) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0} and mask[0].sum().item() == 72 * 48 - 70 * 40
    (back,) = N["GIECropPadding"]().crop(padded, record, "lanczos")
    assert torch.equal(back, img)  # pad -> crop is exact at the padded size
    (bigger,) = N["GIECropPadding"]().crop(torch.rand(2, 96, 144, 3), record, "bicubic")
    assert_image(bigger, 2, 40, 70)
    out = N["GIEPaddingCheck"]().check(padded, "white", 0.005, 8.0)
    fraction, passed = out["result"]
    assert isinstance(fraction, float) and fraction > 0.005 and passed is False
    assert "fail" in out["ui"]["text"][0]
    fraction, passed = N["GIEPaddingCheck"]().check(back, "white", 0.005, 8.0)["result"]
    assert fraction <= 0.005 and passed is True
    custom, rec16, _ = N["GIEPadToRatio"]().pad(img, "default", "black", "top", custom_ratios="16:9, 9:16")
    assert rec16.ratio == (16, 9) and rec16.top == 0
    with pytest.raises(ValueError, match="pad_record does not belong to this image"):
        N["GIECropPadding"]().crop(image(64, 64), record, "lanczos")
    with pytest.raises(ValueError, match="ratio '4-3' must be two positive integers"):
        N["GIEPadToRatio"]().pad(img, "default", "white", "center", custom_ratios="4-3")


def test_rewrite_node_outputs_strings_that_feed_the_encoders(loaded, monkeypatch):
    img = image()
    out = N["GIERewriteInstruction"]().rewrite(loaded.qwen, img, INSTRUCTION, 16, 0.0, 1.0, 0)
    edit, full = out["result"]
    # the tiny random model answers gibberish: the original instruction is kept, and the text says why
    assert edit == INSTRUCTION and full.startswith("[kept the original instruction") and out["ui"]["text"] == [full]

    from gie_core.engine.rewrite import RewriteResult

    def fake(encoder, image, instruction, **kw):
        assert encoder is loaded.qwen.model and kw["max_new_tokens"] == 64
        return RewriteResult("Make the sky orange; keep the trees.", instruction, "Trees under a sky.",
                             "Make the sky orange; keep the trees.", "Trees under an orange sky.", "raw", False, None)

    monkeypatch.setattr(nodes.rewrite, "rewrite_instruction", fake)
    edit, full = N["GIERewriteInstruction"]().rewrite(loaded.qwen, img, INSTRUCTION, 64, 0.0, 1.0, 0)["result"]
    assert edit == "Make the sky orange; keep the trees."
    assert full.splitlines() == ["Input: Trees under a sky.", "Edit: Make the sky orange; keep the trees.",
                                 "Output: Trees under an orange sky."]
    assert_image(run_sampler(loaded.gie_kontext, loaded.vae, fused(loaded, img, instruction=edit), img), 1, 48, 64)


@torch.inference_mode()  # as ComfyUI runs every node
def test_lora_loader_changes_output_and_leaves_the_base_model(loaded):
    img = image()
    cond = fused(loaded, img)
    base = run_sampler(loaded.gie_kontext, loaded.vae, cond, img)
    lora = N["GIELoraLoader"]()
    (full,) = lora.apply(loaded.gie_kontext, "tiny_lora.safetensors", 1.0)
    (zero,) = lora.apply(loaded.gie_kontext, "tiny_lora.safetensors", 0.0)
    (half,) = lora.apply(loaded.gie_kontext, "tiny_lora.safetensors", 0.5)
    assert full.transformer is loaded.gie_kontext.transformer and loaded.gie_kontext.loras == ()
    assert len(loaded.gie_kontext.transformer.peft_config) == 1  # loaded once, shared by the three
    out_full = run_sampler(full, loaded.vae, cond, img)
    out_half = run_sampler(half, loaded.vae, cond, img)
    assert (out_full - base).abs().max() > 1e-3 and (out_half - base).abs().max() > 1e-4
    assert (out_full - out_half).abs().max() > 1e-4
    assert torch.equal(run_sampler(zero, loaded.vae, cond, img), base)
    assert torch.equal(run_sampler(loaded.gie_kontext, loaded.vae, cond, img), base)  # upstream unchanged
    assert torch.equal(run_sampler(full, loaded.vae, cond, img), out_full)


def test_single_file_loaders_match_the_diffusers_folder(loaded):
    (kontext,) = N["GIEKontextModelLoader"]().load("kontext_tiny.safetensors", "fp32", "none")
    (vae,) = N["GIEVAELoader"]().load("ae_tiny.safetensors", "fp32", "none")
    (text,) = N["GIETextEncodersLoader"]().load("clip_l_tiny.safetensors", "t5xxl_tiny.safetensors",
                                               "FLUX.1-Kontext-dev", "fp32", "none")
    img = image()
    _, cond_files = N["GIET5Encode"]().encode(text, INSTRUCTION)
    _, cond_dir = N["GIET5Encode"]().encode(loaded.text, INSTRUCTION)
    assert torch.allclose(cond_files[0][0], cond_dir[0][0], atol=1e-6)
    a = run_sampler(kontext, vae, cond_files, img)
    b = run_sampler(loaded.kontext, loaded.vae, cond_dir, img)
    assert (a - b).abs().max().item() <= 1e-5
    (clip_only,) = N["GIETextEncodersLoader"]().load("clip_l_tiny.safetensors", "none", "FLUX.1-Kontext-dev", "fp32", "none")
    tf, no_cond = N["GIET5Encode"]().encode(clip_only, INSTRUCTION)
    assert tf.t5 is None and no_cond is None
    (vlm,) = N["GIEFusionConnector"]().fuse(loaded.connector, tf, "vlm", N["GIEQwenVLEncode"]().encode(loaded.qwen, img, INSTRUCTION)[0])
    assert vlm[0][0].shape[1] > 0
    with pytest.raises(ValueError, match="needs T5 features"):
        N["GIEFusionConnector"]().fuse(loaded.connector, tf, "vlm+t5", N["GIEQwenVLEncode"]().encode(loaded.qwen, img, INSTRUCTION)[0])
    with pytest.raises(FileNotFoundError, match="bundled tokenizers"):
        N["GIETextEncodersLoader"]().load("clip_l_tiny.safetensors", "none", "comfyui (bundled)", "fp32", "none")


def test_interrupt_raises_and_the_next_run_works(loaded):
    img = image()
    cond = fused(loaded, img)
    before = run_sampler(loaded.gie_kontext, loaded.vae, cond, img)
    comfy.request_interrupt()
    with pytest.raises(SamplingInterrupted):
        run_sampler(loaded.gie_kontext, loaded.vae, cond, img)
    assert not any(b._forward_pre_hooks for b in loaded.gie_kontext.transformer.transformer_blocks)
    assert torch.equal(run_sampler(loaded.gie_kontext, loaded.vae, cond, img), before)


class RecordingPlacement(Placement):
    def __init__(self):
        super().__init__("cpu", "none")
        self.unloaded = []

    def unload(self, *modules):
        self.unloaded.extend(modules)
        super().unload(*modules)


def test_unload_after_sends_the_transformer_and_vae_back(loaded):
    img = image()
    cond = fused(loaded, img)
    kplace, vplace = RecordingPlacement(), RecordingPlacement()
    model = dataclasses.replace(loaded.gie_kontext, placement=kplace)
    vae = dataclasses.replace(loaded.vae, placement=vplace)
    run_sampler(model, vae, cond, img, unload_after=False)
    assert kplace.unloaded == [] and vplace.unloaded == []
    run_sampler(model, vae, cond, img, unload_after=True)
    assert kplace.unloaded == [model.transformer] and vplace.unloaded == [vae.model]
    assert all(p.device.type == "cpu" for p in model.transformer.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to see weights move")
def test_unload_after_moves_weights_to_cpu_on_a_gpu(models_root, monkeypatch):
    monkeypatch.setattr(comfy, "torch_device", lambda: torch.device("cuda"))
    _, _, kontext = N["GIECheckpointLoader"]().load("gpt-image-edit", "fp32", "none")
    _, vae, text = N["GIEKontextDiffusersLoader"]().load("FLUX.1-Kontext-dev", False, True, "fp32", "none")
    _, cond = N["GIET5Encode"]().encode(text, INSTRUCTION)
    out = run_sampler(kontext, vae, cond, image())
    assert out.device.type == "cpu"
    assert next(kontext.transformer.parameters()).device.type == "cuda"  # offload none: stays between runs
    run_sampler(kontext, vae, cond, image(), unload_after=True)
    assert next(kontext.transformer.parameters()).device.type == "cpu"
    assert next(vae.model.parameters()).device.type == "cpu"
    (moving,) = N["GIEKontextModelLoader"]().load("kontext_tiny.safetensors", "fp32", "model")
    run_sampler(moving, vae, cond, image())
    assert next(moving.transformer.parameters()).device.type == "cpu"  # offload model: back after use


# ---------------------------------------------------------------------------------------------
# With ComfyUI's modules (stand-ins with the same interface)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_comfyui(tmp_path, tiny_set, models_root, monkeypatch):
    """folder_paths, comfy.model_management and comfy.utils as ComfyUI defines them (the parts we use)."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {k: ([str(models_root / k)], {".safetensors"}) for k in
                                 ("diffusers", "loras", "diffusion_models", "vae", "text_encoders")}

    def add_model_folder_path(name, path, is_default=False):
        paths = fp.folder_names_and_paths.setdefault(name, ([], set()))[0]
        paths.insert(0, path) if is_default else paths.append(path)

    def get_filename_list(name):
        out = []
        for root in fp.folder_names_and_paths[name][0]:
            out += [p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file()]
        return sorted(out)

    def get_full_path(name, filename):
        for root in fp.folder_names_and_paths[name][0]:
            if (Path(root) / filename).is_file():
                return str(Path(root) / filename)
        return None

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path

    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    state = types.SimpleNamespace(checks=0, raise_at=None, freed=[], emptied=0, bars=[])

    def throw():
        state.checks += 1
        if state.raise_at is not None and state.checks == state.raise_at:
            raise InterruptProcessingException()

    mm.InterruptProcessingException = InterruptProcessingException
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.throw_exception_if_processing_interrupted = throw
    mm.free_memory = lambda nbytes, device, keep_loaded=[]: state.freed.append((nbytes, device))
    mm.soft_empty_cache = lambda force=False: setattr(state, "emptied", state.emptied + 1)

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.updates = total, []
            state.bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.updates.append((value, total))

    utils.ProgressBar = ProgressBar
    previews = types.ModuleType("latent_preview")  # ComfyUI's previewer: records what it was given

    class Previewer:
        def decode_latent_to_preview_image(self, fmt, x0):
            state.previews.append(tuple(x0.shape))
            return (fmt, None, 512)

    previews.get_previewer = lambda device, latent_format: Previewer() if latent_format == "flux" else None
    formats = types.ModuleType("comfy.latent_formats")
    formats.Flux = lambda: "flux"
    state.previews = []
    pkg = types.ModuleType("comfy")
    pkg.__path__ = [str(tmp_path / "comfy")]
    shutil.copytree(tiny_set.kontext_dir / "tokenizer", tmp_path / "comfy" / "sd1_tokenizer")
    shutil.copytree(tiny_set.kontext_dir / "tokenizer_2", tmp_path / "comfy" / "text_encoders" / "t5_tokenizer")
    pkg.model_management, pkg.utils = mm, utils
    for name, module in (("folder_paths", fp), ("comfy", pkg), ("comfy.model_management", mm), ("comfy.utils", utils),
                         ("latent_preview", previews), ("comfy.latent_formats", formats)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(comfy, "torch_device", _real_torch_device)
    comfy.reset()
    yield types.SimpleNamespace(fp=fp, mm=mm, state=state, models=models_root)
    comfy.reset()


def test_with_comfyui_folders_progress_interrupt_and_tokenizers(fake_comfyui, loaded, tmp_path):
    st = fake_comfyui.state
    assert comfy.have_comfy() and comfy.torch_device() == torch.device("cpu")
    comfy.register_model_folder()
    gie_path = Path(fake_comfyui.fp.models_dir) / "gpt_image_edit"
    assert fake_comfyui.fp.folder_names_and_paths["gpt_image_edit"][0] == [str(gie_path)] and gie_path.is_dir()
    (gie_path / "gpt-image-edit").symlink_to(fake_comfyui.models / "gpt_image_edit" / "gpt-image-edit")
    assert N["GIECheckpointLoader"].INPUT_TYPES()["required"]["checkpoint"][0] == ["gpt-image-edit"]
    assert "tiny_lora.safetensors" in N["GIELoraLoader"].INPUT_TYPES()["required"]["lora_name"][0]

    img = image()
    cond = fused(loaded, img)
    reference = run_sampler(loaded.gie_kontext, loaded.vae, cond, img, steps=3)
    assert st.bars[-1].total == 3 and st.bars[-1].updates == [(1, 3), (2, 3), (3, 3)]
    assert st.previews == [(1, 16, 6, 8)] * 3  # a latent preview per step, through ComfyUI's previewer
    # the check runs before each step and before every transformer block (1 double + 1 single here):
    # the 3rd check is inside step 1, before its single block
    st.checks, st.raise_at = 0, 3
    with pytest.raises(fake_comfyui.mm.InterruptProcessingException):
        run_sampler(loaded.gie_kontext, loaded.vae, cond, img, steps=3)
    assert st.bars[-1].updates == []  # stopped within the first step
    st.raise_at = None
    assert torch.equal(run_sampler(loaded.gie_kontext, loaded.vae, cond, img, steps=3), reference)

    (text,) = N["GIETextEncodersLoader"]().load("clip_l_tiny.safetensors", "t5xxl_tiny.safetensors",
                                               "comfyui (bundled)", "fp32", "model")
    _, ours = N["GIET5Encode"]().encode(text, INSTRUCTION)
    _, stock = N["GIET5Encode"]().encode(loaded.text, INSTRUCTION)
    assert torch.allclose(ours[0][0], stock[0][0], atol=1e-6)


def test_awkward_images_through_the_nodes(loaded):
    """The awkward-image set as ComfyUI hands it over (IMAGE tensors): a correct result or a
    clear error naming the input, never a traceback from deep inside or a wrong size."""
    pad, crop = N["GIEPadToRatio"](), N["GIECropPadding"]()
    huge = torch.zeros(1, 1, 1, 3).expand(1, 8000, 8000, 3)  # no 768 MB allocated: refused from the shape
    for bad, fragment in ((torch.rand(1, 1, 64, 3), "at least 16 px"), (torch.rand(1, 64, 1, 3), "at least 16 px"),
                          (huge, "at most 4096 px"), (torch.full((1, 32, 32, 3), float("nan")), "NaN")):
        with pytest.raises(ValueError, match=fragment) as exc:
            pad.pad(bad, "default", "white", "center")
        assert "image" in str(exc.value)
        with pytest.raises(ValueError, match=fragment):
            run_sampler(loaded.kontext, loaded.vae, [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 32)}]], bad)
    with pytest.raises(ValueError, match="guidance is nan"):
        run_sampler(loaded.kontext, loaded.vae, fused(loaded, image()), image(), guidance=float("nan"))
    with pytest.raises(ValueError, match="strength is inf but must be a finite number"):
        N["GIELoraLoader"]().apply(loaded.kontext, "missing.safetensors", float("inf"))
    with pytest.raises(ValueError, match="true CFG scale is inf"):
        run_sampler(loaded.kontext, loaded.vae, fused(loaded, image()), image(), true_cfg=float("inf"),
                    negative=fused(loaded, image()))

    # width set, height 0: the sampler follows the padded aspect, rounded to 16 (80x48 for 3:2, 11% off
    # 3:2), and Crop Padding takes exactly that back to the original size
    src = image(90, 50)
    padded, record, _ = pad.pad(src, "default", "white", "center")
    cond = fused(loaded, padded)
    out = run_sampler(loaded.gie_kontext, loaded.vae, cond, padded, width=80, height=0, steps=1)
    assert out.shape == (1, 48, 80, 3)
    (back,) = crop.crop(out, record, "lanczos")
    assert back.shape == (1, 50, 90, 3)

    # a 4000x1000 panorama: padded to 3:2, edited at a small size, cropped back to 4000x1000
    wide = image(4000, 1000)
    padded, record, _ = pad.pad(wide, "default", "white", "center")
    assert padded.shape == (1, 2668, 4002, 3) and record.ratio == (3, 2)
    out = run_sampler(loaded.kontext, loaded.vae, cond, padded, width=64, height=0, steps=1, resize="preferred")
    (back,) = crop.crop(out, record, "lanczos")
    assert back.shape == (1, 1000, 4000, 3)


def test_split_file_loaders_match_the_checkpoint_folder(loaded, models_root):
    """Qwen2.5-VL and the connector from gie-convert's single files (models/text_encoders,
    models/gie_connectors) encode and fuse exactly as the checkpoint folder's parts do."""
    comfy.reset()
    comfy.set_model_roots({k: [models_root / k] for k in ("gpt_image_edit", "text_encoders", "gie_connectors")})
    qwen_files = [n for n in N["GIEQwenVLLoader"].INPUT_TYPES()["required"]["qwen_name"][0] if "qwen2.5-vl" in n]
    (qwen,) = N["GIEQwenVLLoader"]().load(qwen_files[0], "gpt-image-edit", "if present", "fp32", "none")
    conn_name = N["GIEConnectorLoader"].INPUT_TYPES()["required"]["connector_name"][0][0]
    (connector,) = N["GIEConnectorLoader"]().load(conn_name, "fp32", "none")
    img = image()
    (qf_split,) = N["GIEQwenVLEncode"]().encode(qwen, img, INSTRUCTION)
    (qf_folder,) = N["GIEQwenVLEncode"]().encode(loaded.qwen, img, INSTRUCTION)
    assert torch.equal(qf_split.hidden, qf_folder.hidden)
    tf, _ = N["GIET5Encode"]().encode(loaded.text, INSTRUCTION)
    (a,) = N["GIEFusionConnector"]().fuse(connector, tf, "vlm+t5", qf_split)
    (b,) = N["GIEFusionConnector"]().fuse(loaded.connector, tf, "vlm+t5", qf_folder)
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1]["pooled_output"], b[0][1]["pooled_output"])
    from gie_core.weights.single_file import load_qwen_file

    with pytest.raises(FileNotFoundError, match="not a file in models/text_encoders"):
        N["GIEQwenVLLoader"]().load("missing.safetensors", "gpt-image-edit", "never", "fp32", "none")
    tok = models_root / "gpt_image_edit" / "gpt-image-edit"
    with pytest.raises(ValueError, match="looks like a FLUX transformer, not a Qwen2.5-VL"):
        load_qwen_file(models_root / "diffusion_models" / "kontext_tiny.safetensors", tokenizer_dir=tok)
    no_head = [n for n in qwen_files if "lm_head" not in n]
    if no_head:
        with pytest.raises(ValueError, match="no lm_head"):
            N["GIEQwenVLLoader"]().load(no_head[0], "gpt-image-edit", "required", "fp32", "none")


def test_native_reference_latents_are_kontext_references_and_combine_is_refused(loaded):
    """ReferenceLatent (native) on our conditioning: its latent becomes a second Kontext reference,
    exactly as if the engine were given both images (placed side by side, native's default)."""
    from gie_core.imaging.images import prepare_reference
    from gie_core.engine.request import resolve_edit
    from gie_core.engine.sampler import KontextModels, sample

    img, other = image(64, 48, seed=1), image(64, 48, seed=2)
    cond = fused(loaded, img)
    vae = loaded.vae.model
    with torch.no_grad():  # what native VAEEncode + ReferenceLatent put on the conditioning: raw latents
        raw = vae.encode(prepare_reference(other, "keep")).latent_dist.mode()
    with_ref = [[cond[0][0], {**cond[0][1], "reference_latents": [raw]}]]
    plain = run_sampler(loaded.gie_kontext, loaded.vae, cond, img, steps=2)
    both = run_sampler(loaded.gie_kontext, loaded.vae, with_ref, img, steps=2)
    assert not torch.equal(plain, both)  # the reference latent is used, never silently dropped
    from gie_core.engine.conditioning import Conditioning

    engine = sample(KontextModels(loaded.gie_kontext.transformer, vae, loaded.gie_kontext.scheduler),
                    Conditioning.from_comfy(cond), [prepare_reference(img, "keep"), prepare_reference(other, "keep")],
                    resolve_edit(image_width=64, image_height=48, width=64, height=48, steps=2, seed=3,
                                 reference_resize="keep", reference_method="offset"))
    assert torch.allclose(both, engine, atol=1e-5)
    combined = [cond[0], [cond[0][0] * 0.5, dict(cond[0][1])]]
    with pytest.raises(ValueError, match="2 entries \\(ConditioningCombine"):
        run_sampler(loaded.gie_kontext, loaded.vae, combined, img)
    uxo = [[cond[0][0], {**cond[0][1], "reference_latents": [raw], "reference_latents_method": "uxo"}]]
    with pytest.raises(ValueError, match="reference_latents_method 'uxo'"):
        run_sampler(loaded.gie_kontext, loaded.vae, uxo, img)
    masked = [[cond[0][0], {**cond[0][1], "mask": torch.ones(1, 8, 8)}]]
    with pytest.raises(ValueError, match="sets mask, which this sampler does not apply"):
        run_sampler(loaded.gie_kontext, loaded.vae, masked, img)


class ComfyLikeVAE:
    """ComfyUI's VAE contract (comfy.sd.VAE): encode takes IMAGE [B, H, W, C] in 0..1 and gives the
    raw latent (the posterior's mode); decode takes a raw latent and gives IMAGE. Built on the same
    diffusers weights; the real object is exercised by tests/test_comfy_server.py."""

    def __init__(self, vae):
        self.first_stage_model = vae

    def encode(self, pixels):
        with torch.no_grad():
            return self.first_stage_model.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()

    def decode(self, latent):
        with torch.no_grad():
            return (self.first_stage_model.decode(latent, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).movedim(1, -1)


class ComfyLikeClip:
    """ComfyUI's CLIP contract (DualCLIPLoader, type flux): tokenize(text) then
    encode_from_tokens(tokens, return_pooled=True) -> (T5 tokens [1, 256, D], CLIP-L pooled [1, P])."""

    def __init__(self, text):
        self.text = text

    def tokenize(self, text):
        return {"text": text}

    def encode_from_tokens(self, tokens, return_pooled=False):
        t = tokens["text"]
        t5, pooled = self.text.t5_tokens([t]), self.text.clip_pooled([t])
        return (t5, pooled) if return_pooled else t5


def test_native_vae_and_text_encoders_serve_our_nodes(loaded):
    """Users' own Load VAE and DualCLIPLoader outputs plug into the sampler, T5 Encode and the
    Fusion Connector (text_conditioning / empty_conditioning), with the same results as ours."""
    img = image()
    cond = fused(loaded, img)
    ours = run_sampler(loaded.gie_kontext, loaded.vae, cond, img, steps=2)
    native = run_sampler(loaded.gie_kontext, ComfyLikeVAE(loaded.vae.model), cond, img, steps=2)
    assert torch.allclose(ours, native, atol=1e-4)
    clip = ComfyLikeClip(loaded.text.model)
    tf_native, c_native = N["GIET5Encode"]().encode(clip, INSTRUCTION)
    tf, c = N["GIET5Encode"]().encode(loaded.text, INSTRUCTION)
    assert torch.allclose(tf_native.t5, tf.t5, atol=1e-6) and torch.allclose(tf_native.pooled_empty, tf.pooled_empty)
    (qf,) = N["GIEQwenVLEncode"]().encode(loaded.qwen, img, INSTRUCTION)
    t5_empty, pooled_empty = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    empty = [[t5_empty, {"pooled_output": pooled_empty}]]  # native CLIPTextEncode of "" (its pooled output is read)
    for mode in ("vlm+t5", "vlm", "t5"):
        (a,) = N["GIEFusionConnector"]().fuse(loaded.connector, None, mode, qf, text_conditioning=c, empty_conditioning=empty)
        (b,) = N["GIEFusionConnector"]().fuse(loaded.connector, tf, mode, qf)
        assert torch.allclose(a[0][0], b[0][0], atol=1e-6) and torch.allclose(a[0][1]["pooled_output"], b[0][1]["pooled_output"])
    with pytest.raises(ValueError, match="connect empty_conditioning"):
        N["GIEFusionConnector"]().fuse(loaded.connector, None, "vlm", qf, text_conditioning=c)
    with pytest.raises(ValueError, match="not both"):
        N["GIEFusionConnector"]().fuse(loaded.connector, tf, "vlm+t5", qf, text_conditioning=c)
    with pytest.raises(TypeError, match="vae must come from a GIE VAE loader or ComfyUI's Load VAE"):
        run_sampler(loaded.gie_kontext, object(), cond, img)


def test_loaders_store_weights_small_and_read_gguf(loaded, models_root):
    """fp8 storage from the loader nodes, GGUF transformer files listed and read by the model loader;
    the sampler runs on each and stays near the full-precision result."""
    from gie_core.weights.convert import convert

    convert(loaded_gie_dir(models_root), models_root,
            parts=("transformer",), transformer_format="gguf_q8_0", name="gie-tiny", overwrite=True)
    comfy.reset()
    comfy.set_model_roots({k: [models_root / k] for k in ("gpt_image_edit", "diffusion_models", "text_encoders")})
    names = N["GIEKontextModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert "gie-tiny-kontext-gguf_q8_0.gguf" in names
    img = image()
    cond = fused(loaded, img)
    ref = run_sampler(loaded.gie_kontext, loaded.vae, cond, img, steps=1)
    (q8,) = N["GIEKontextModelLoader"]().load("gie-tiny-kontext-gguf_q8_0.gguf", "fp32", "none")
    (fp8,) = N["GIECheckpointLoader"]().load("gpt-image-edit", "fp32", "none", "fp8", "fp8")[2:]
    assert any(p.dtype == torch.float8_e4m3fn for p in fp8.transformer.parameters())
    for model in (q8, fp8):
        out = run_sampler(model, loaded.vae, cond, img, steps=1)
        assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.25
    qwen_file = next(n for n in N["GIEQwenVLLoader"].INPUT_TYPES()["required"]["qwen_name"][0] if "qwen2.5-vl" in n)
    (qwen,) = N["GIEQwenVLLoader"]().load(qwen_file, "gpt-image-edit", "never", "fp32", "none", "fp8")
    assert torch.isfinite(N["GIEQwenVLEncode"]().encode(qwen, img, INSTRUCTION)[0].hidden).all()
    with pytest.raises(ValueError, match="transformer quantization 'nf4' is not available for the transformer"):
        N["GIEKontextModelLoader"]().load("gie-tiny-kontext-gguf_q8_0.gguf", "fp32", "none", "nf4")


def loaded_gie_dir(models_root):
    return (models_root / "gpt_image_edit" / "gpt-image-edit").resolve()


# ---------------------------------------------------------------------------------------------
# Two images, conversations, answers and the task head (issue 17)
# ---------------------------------------------------------------------------------------------


def image8(width=64, height=48, seed=0) -> torch.Tensor:
    """An image exact in 8 bits: a conversation keeps its images as 8-bit pictures, as the app does."""
    return (image(width, height, seed=seed) * 255).round() / 255


def turn(loaded, instruction=INSTRUCTION, *, route="edit", resize="keep", **optional):
    """GIE Conversation Turn's full result ({"ui", "result"}) with the checkpoint's parts."""
    return N["GIEConversationTurn"]().turn(loaded.qwen, loaded.connector, loaded.text, loaded.vae, instruction,
                                          "vlm+t5", route, resize, **optional)


@pytest.fixture(scope="module")
def pipe(tiny_set):
    from gie_core.engine.pipeline import EditPipeline

    return EditPipeline.from_paths(gie_dir=tiny_set.gie_dir, kontext_dir=tiny_set.kontext_dir, mode="vlm+t5",
                                   dtype="fp32", device="cpu", lm_head=True)


def test_two_images_through_qwen_encode_and_our_sampler_equal_the_library(loaded, pipe):
    """Image 2 on Qwen-VL Encode and Kontext Sampler: Qwen reads both images, Kontext gets each at its
    own size (never stacked); the node chain equals EditPipeline.edit(image, image2=...)."""
    img, img2 = image8(64, 48, seed=1), image8(32, 48, seed=2)  # different sizes
    (qf,) = N["GIEQwenVLEncode"]().encode(loaded.qwen, img, INSTRUCTION, image_2=img2)
    (qf1,) = N["GIEQwenVLEncode"]().encode(loaded.qwen, img, INSTRUCTION)
    assert qf.hidden.shape[1] > qf1.hidden.shape[1]  # the second image's tokens are in
    tf, _ = N["GIET5Encode"]().encode(loaded.text, INSTRUCTION)
    (cond,) = N["GIEFusionConnector"]().fuse(loaded.connector, tf, "vlm+t5", qf)
    ours = run_sampler(loaded.gie_kontext, loaded.vae, cond, img, seed=5, image_2=img2)
    assert_image(ours, 1, 48, 64)
    ref = pipe.edit(img, INSTRUCTION, image2=img2, steps=2, seed=5, size=(64, 48), reference_resize="keep").tensor
    assert (ours - ref).abs().max().item() <= 1e-5
    one = run_sampler(loaded.gie_kontext, loaded.vae, cond, img, seed=5)
    assert (ours - one).abs().max().item() > 1e-4  # image 2 is a reference, not dropped


def test_two_image_output_size_follows_the_apps_rule(loaded, monkeypatch):
    """width/height 0 with two images: the mean of their sizes at ~1 MP (the library's rule), the same
    size the Conversation Turn reports."""
    from gie_core.engine import request as request_module
    from gie_core.imaging.ratio import multi_image_output_size

    img, img2 = image(64, 48, seed=1), image(32, 48, seed=2)
    want = multi_image_output_size([(64, 48), (32, 48)])
    out = turn(loaded, image=img, image_2=img2)["result"]
    assert (out[2], out[3]) == want
    seen = []
    real = request_module.resolve_edit
    monkeypatch.setattr(sys.modules["nodes.sampling"], "resolve_edit", lambda **kw: seen.append(real(**kw)) or real(
        **{**kw, "width": 32, "height": 32}))  # record the auto size, sample small
    (qf,) = N["GIEQwenVLEncode"]().encode(loaded.qwen, img, INSTRUCTION, image_2=img2)
    tf, _ = N["GIET5Encode"]().encode(loaded.text, INSTRUCTION)
    (cond,) = N["GIEFusionConnector"]().fuse(loaded.connector, tf, "vlm+t5", qf)
    run_sampler(loaded.gie_kontext, loaded.vae, cond, img, image_2=img2, width=0, height=0, steps=1)
    run_sampler(loaded.gie_kontext, loaded.vae, out[0], None, width=0, height=0, steps=1)
    assert [(r.width, r.height) for r in seen] == [want, want]


def test_conversation_turn_gives_references_for_both_samplers(loaded):
    """A turn's CONDITIONING carries every image of the conversation as raw latents (what native
    VAEEncode + ReferenceLatent give, placed by the library's method), so our sampler with no image
    equals it given the image, and native KSampler needs nothing more."""
    from gie_core.constants import DEFAULT_REFERENCE_METHOD
    from gie_core.imaging.images import prepare_reference

    img = image8(64, 48, seed=1)
    out = turn(loaded, image=img)
    cond, conv, *_ = out["result"]
    assert conv.pending and len(conv.turns) == 1 and "edit" in out["ui"]["text"][0]
    info = cond[0][1]
    assert info["reference_latents_method"] == DEFAULT_REFERENCE_METHOD
    (raw,) = info["reference_latents"]
    with torch.no_grad():
        native = loaded.vae.model.encode(prepare_reference(img, "keep")).latent_dist.mode()
    assert torch.allclose(raw, native, atol=1e-5)  # native VAEEncode's raw latent
    from_turn = run_sampler(loaded.gie_kontext, loaded.vae, cond, None, seed=4)
    plain = [[cond[0][0], {"pooled_output": info["pooled_output"], "reference_latents_method": "index"}]]
    given = run_sampler(loaded.gie_kontext, loaded.vae, plain, img, seed=4)
    assert torch.allclose(from_turn, given, atol=1e-4)
    with pytest.raises(ValueError, match="leave image and image_2 unconnected"):
        run_sampler(loaded.gie_kontext, loaded.vae, cond, img)


def test_conversation_turn_equals_the_library(loaded, pipe):
    """Two turns through the nodes (the second conditioned on the first's image) give the library's
    conditioning of the same conversation."""
    img, img2 = image8(64, 48, seed=1), image8(48, 48, seed=2)
    cond1, conv1, *_ = turn(loaded, image=img, image_2=img2)["result"]
    assert torch.allclose(cond1[0][0], pipe.conversation_conditioning(conv1, "vlm+t5").context, atol=1e-5)
    result = run_sampler(loaded.gie_kontext, loaded.vae, cond1, None, width=32, height=32)
    cond2, conv2, *_ = turn(loaded, "now make it winter", conversation=conv1, previous_result=result)["result"]
    assert [t.role for t in conv2.turns] == ["user", "assistant", "user"] and len(conv2.images()) == 3
    assert len(cond2[0][1]["reference_latents"]) == 3  # both inputs and the first edit
    assert torch.allclose(cond2[0][0], pipe.conversation_conditioning(conv2, "vlm+t5").context, atol=1e-5)


def test_answer_node_returns_text_and_continues_the_conversation(loaded, pipe):
    img = image(64, 48, seed=1)
    out = N["GIEAnswer"]().answer(loaded.qwen, "what colour is the sky?", 8, image=img)
    text, conv = out["result"]
    assert isinstance(text, str) and out["ui"]["text"] == [text]
    assert text == pipe.ask(img, "what colour is the sky?", max_new_tokens=8).text
    assert [t.role for t in conv.turns] == ["user", "assistant"] and conv.turns[-1].text == text
    # an answered conversation continues with an edit, and a forced answer route blocks the conditioning
    cond, conv2, *_ = turn(loaded, "make it red", conversation=conv)["result"]
    assert len(cond[0][1]["reference_latents"]) == 1 and conv2.pending
    answered = turn(loaded, "and now?", route="answer", conversation=conv2, previous_result=image(32, 32),
                    max_new_tokens=4)["result"]
    assert answered[0] is None and answered[2] is None and isinstance(answered[4], str)  # blocked without ComfyUI
    assert answered[1].turns[-1].text == answered[4]


def test_conversation_inputs_are_checked_before_any_model_runs(loaded):
    img = image()
    cond, conv, *_ = turn(loaded, image=img)["result"]
    with pytest.raises(ValueError, match="connect that turn's edited image .* to previous_result"):
        turn(loaded, "again", conversation=conv)
    with pytest.raises(ValueError, match="no edit waiting for its image"):
        N["GIEAnswer"]().answer(loaded.qwen, "why?", 4, image=img, previous_result=img)
    with pytest.raises(ValueError, match="image_2 is connected but image is not"):
        turn(loaded, image_2=img)
    with pytest.raises(ValueError, match="a batch of 2 images"):
        turn(loaded, image=image(batch=2))
    with pytest.raises(ValueError, match="image_2 is connected but image is not"):
        run_sampler(loaded.gie_kontext, loaded.vae, cond, None, image_2=img)
    plain = [[cond[0][0], {"pooled_output": cond[0][1]["pooled_output"]}]]
    with pytest.raises(ValueError, match="image is not connected and positive carries no reference latents"):
        run_sampler(loaded.gie_kontext, loaded.vae, plain, None)
    with pytest.raises(TypeError, match="conversation must come from a GIE turn node"):
        turn(loaded, conversation="chat.json", image=img)
    small = image(16, 16)
    full = Conversation()
    for text, n in (("a", 2), ("b", 2), ("c", 1)):  # 8 images: the most a conversation keeps
        full = full.add_user(text, [small] * n).add_assistant_image(small)
    with pytest.raises(ValueError, match="at most 8 are kept"):
        turn(loaded, "one more", conversation=full)


def test_a_turn_without_any_image_is_text_to_image(loaded, pipe):
    """As in the app: no image in the conversation means text to image (no Kontext reference, the app's
    1024x1024 when the size is automatic); our sampler takes the turn's conditioning as it is."""
    from gie_core.constants import TEXT_TO_IMAGE_SIZE
    from gie_core.engine.request import resolve_edit

    cond, conv, width, height, _ = turn(loaded, "a red bicycle")["result"]
    assert "reference_latents" not in cond[0][1] and not conv.images()
    want = resolve_edit(image_width=TEXT_TO_IMAGE_SIZE[0], image_height=TEXT_TO_IMAGE_SIZE[1])
    assert (width, height) == (want.width, want.height)
    assert torch.allclose(cond[0][0], pipe.conversation_conditioning(conv, "vlm+t5").context, atol=1e-5)
    assert_image(run_sampler(loaded.gie_kontext, loaded.vae, cond, None, width=32, height=32, steps=1), 1, 32, 32)


def test_turn_nodes_touch_no_model_for_bad_input(loaded, monkeypatch):
    """Bad input is refused before Qwen, the connector or the VAE run."""
    monkeypatch.setattr(type(loaded.qwen.model), "encode_conversation",
                        lambda *a, **k: pytest.fail("Qwen ran for a turn that was refused"))
    monkeypatch.setattr(type(loaded.qwen.model), "answer", lambda *a, **k: pytest.fail("Qwen answered a refused turn"))
    with pytest.raises(ValueError, match="image_2 is connected but image is not"):
        turn(loaded, image_2=image())
    with pytest.raises(ValueError, match="instruction is empty"):
        N["GIEAnswer"]().answer(loaded.qwen, " ", 8, image=image())


@pytest.fixture(scope="module")
def task_head_checkpoint(models_root, tiny_set):
    """The tiny checkpoint with a task head beside it that always answers (bias favours 'answer')."""
    from safetensors.torch import save_file

    from gie_core.constants import TASK_HEAD_SAFETENSORS
    from gie_core.engine.taskhead import TaskHead

    folder = models_root / "gpt_image_edit" / "gie-with-head"
    folder.mkdir()
    for f in tiny_set.gie_dir.iterdir():
        (folder / f.name).symlink_to(f)
    hidden = json_config(tiny_set.gie_dir)["hidden_size"]
    head = TaskHead(hidden, 8)
    with torch.no_grad():
        head[3].weight.zero_()
        head[3].bias.copy_(torch.tensor([5.0, -5.0]))  # [answer, edit]
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, folder / TASK_HEAD_SAFETENSORS)
    return "gie-with-head"


def json_config(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())


def test_route_auto_asks_the_task_head_and_edits_without_one(loaded, task_head_checkpoint):
    (head,) = N["GIETaskHeadLoader"]().load(task_head_checkpoint)
    img = image()
    out = turn(loaded, "what is this?", route="auto", image=img, task_head=head, max_new_tokens=4)
    cond, conv, _, _, text = out["result"]
    assert cond is None and isinstance(text, str) and conv.turns[-1].text == text  # answered
    without = turn(loaded, "what is this?", route="auto", image=img)
    assert without["result"][4] is None and without["result"][1].pending  # edited, with the reason shown
    assert "task head" in without["ui"]["text"][0]
    forced = turn(loaded, "what is this?", route="edit", image=img, task_head=head)
    assert forced["result"][1].pending
    with pytest.raises(Exception, match="holds no task_head"):  # a folder without one says so
        N["GIETaskHeadLoader"]().load("gpt-image-edit")
