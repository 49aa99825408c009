"""Loaders: every model comes from ComfyUI's model folders through a dropdown, never a typed path.

Each node names a part and its file or folder; :func:`gie_core.weights.parts.load_part` decides
everything about the format (as ComfyUI-GGUF's nodes call its loader). Weights load to the CPU
(bitsandbytes ones where they run); each part visits the device when a node uses it (see the
``offload`` input). ComfyUI caches node outputs, so a loaded model stays loaded between runs
until its inputs change.
"""

from __future__ import annotations

from gie_core.constants import LORA_STRENGTH_RANGE
from gie_core.checks import check_float
from gie_core.engine.components import KontextModel, PlacedModel
from gie_core.weights.parts import check_load, load, load_part, load_text_encoders, quantize_choices, scheduler_from
from gie_core.weights.quantize import NO_QUANTIZATION, STORAGE_TABLE

from . import comfy
from .common import (
    CAT_LOADERS,
    CONNECTOR,
    DTYPE_INPUT,
    KONTEXT,
    OFFLOAD_INPUT,
    QWEN_VL,
    TEXT_ENCODERS,
    VAE,
    placement,
    require,
)

COMFY_TOKENIZERS = "comfyui (bundled)"


def _quant_input(part: str) -> tuple:
    """An optional dropdown of the part's lighter storage (rows of gie_core.weights.quantize.STORAGE_TABLE)."""
    names = quantize_choices(part)
    described = [f"{NO_QUANTIZATION}: {STORAGE_TABLE['auto'].description}"] + [
        f"{n}: {STORAGE_TABLE[n].description}" for n in names if n != NO_QUANTIZATION]
    return (list(names), {"default": NO_QUANTIZATION,
                          "tooltip": f"How the {part} weights are stored: " + "; ".join(described) + "."})
QWEN_LM_HEAD = ("if present", "never", "required")
NO_T5 = "none"


def _choices(names: list[str], tooltip: str) -> tuple:
    """A dropdown of model names (ComfyUI refreshes it when the node list is reloaded)."""
    spec = {"tooltip": tooltip}
    if names:
        spec["default"] = names[0]
    return (names, spec)


class GIECheckpointLoader:
    DESCRIPTION = (
        "Loads a GPT-Image-Edit checkpoint folder (the released layout) from models/gpt_image_edit and splits "
        "it into its Qwen2.5-VL encoder, the fusion connector and the fine-tuned FLUX.1 Kontext model."
    )
    CATEGORY = CAT_LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (QWEN_VL, CONNECTOR, KONTEXT)
    RETURN_NAMES = ("qwen_vl", "connector", "kontext_model")
    OUTPUT_TOOLTIPS = (
        "The Qwen2.5-VL encoder (image + instruction features, instruction rewriting).",
        "The connector projecting Qwen-VL features into Kontext context tokens.",
        "The fine-tuned Kontext transformer with the FLUX scheduler.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "checkpoint": _choices(
                    comfy.list_model_dirs(comfy.GIE_FOLDER),
                    "A checkpoint folder inside models/gpt_image_edit (config.json + model-*.safetensors shards + "
                    "the Qwen tokenizer and preprocessor files), e.g. the released final_checkpoint renamed gpt-image-edit.",
                ),
                "dtype": DTYPE_INPUT,
                "offload": OFFLOAD_INPUT,
            },
            "optional": {
                "transformer_quantize": _quant_input("transformer"),
                "qwen_quantize": _quant_input("qwen"),
            },
        }

    def load(self, checkpoint, dtype, offload, transformer_quantize=NO_QUANTIZATION, qwen_quantize=NO_QUANTIZATION):
        path = comfy.resolve_model_dir(comfy.GIE_FOLDER, checkpoint)
        place = placement(offload)
        common = {"dtype": dtype, "run_device": place.device}
        plans = [check_load("qwen", path, qwen_quantize, **common), check_load("connector", path, **common),
                 check_load("transformer", path, transformer_quantize, **common)]  # all checked, then loaded
        qwen, connector, transformer = (load(plan).module for plan in plans)
        source = f"gpt_image_edit/{checkpoint}"
        kontext = KontextModel(transformer, scheduler_from(), place, source=source)
        return PlacedModel(qwen, place, source), PlacedModel(connector, place, source), kontext


class GIEKontextDiffusersLoader:
    DESCRIPTION = (
        "Loads FLUX.1 Kontext [dev] from a diffusers folder in models/diffusers: the transformer with its "
        "scheduler, the VAE, and the CLIP-L + T5-XXL text encoders."
    )
    CATEGORY = CAT_LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (KONTEXT, VAE, TEXT_ENCODERS)
    RETURN_NAMES = ("kontext_model", "vae", "text_encoders")
    OUTPUT_TOOLTIPS = (
        "The stock Kontext transformer with the folder's scheduler (empty when load_transformer is off).",
        "The FLUX VAE.",
        "CLIP-L (pooled vector) and T5-XXL (tokens; absent when load_t5 is off).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "kontext": _choices(
                    comfy.list_model_dirs("diffusers"),
                    "A FLUX.1-Kontext-dev diffusers folder inside models/diffusers (model_index.json, transformer/, "
                    "vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/).",
                ),
                "load_transformer": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Load the stock Kontext transformer. Turn off when the GPT-Image-Edit checkpoint "
                        "supplies the fine-tuned one, to save ~24 GB of memory.",
                    },
                ),
                "load_t5": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Load T5-XXL. Off saves ~9 GB when only the 'vlm' fusion mode is used (it needs "
                        "CLIP only).",
                    },
                ),
                "dtype": DTYPE_INPUT,
                "offload": OFFLOAD_INPUT,
            },
            "optional": {"transformer_quantize": _quant_input("transformer")},
        }

    def load(self, kontext, load_transformer, load_t5, dtype, offload, transformer_quantize=NO_QUANTIZATION):
        path = comfy.resolve_model_dir("diffusers", kontext)
        place = placement(offload)
        common = {"dtype": dtype, "run_device": place.device}
        plans = {"vae": check_load("vae", path, **common), "clip": check_load("clip", path, **common)}
        if load_transformer:
            plans["transformer"] = check_load("transformer", path, transformer_quantize, **common)
        if load_t5:
            plans["t5"] = check_load("t5", path, **common)
        transformer = load(plans["transformer"]).module if load_transformer else None
        text = load_text_encoders(plans["clip"], plans.get("t5"))
        source = f"diffusers/{kontext}"
        return (
            KontextModel(transformer, scheduler_from(path), place, source=source),
            PlacedModel(load(plans["vae"]).module, place, source),
            PlacedModel(text, place, source),
        )


class GIEKontextModelLoader:
    DESCRIPTION = (
        "Loads a FLUX.1 Kontext transformer from a single file in models/diffusion_models (BFL layout as "
        "ComfyUI keeps it, bf16/fp16 or fp8, or diffusers layout), with the FLUX scheduler."
    )
    CATEGORY = CAT_LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (KONTEXT,)
    RETURN_NAMES = ("kontext_model",)
    OUTPUT_TOOLTIPS = ("The Kontext transformer with the FLUX scheduler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": _choices(
                    comfy.list_model_files("diffusion_models"),
                    "A Kontext transformer file in models/diffusion_models, e.g. flux1-kontext-dev.safetensors "
                    "(fp8 files are upcast to dtype).",
                ),
                "dtype": DTYPE_INPUT,
                "offload": OFFLOAD_INPUT,
            },
            "optional": {"transformer_quantize": _quant_input("transformer")},
        }

    def load(self, model_name, dtype, offload, transformer_quantize=NO_QUANTIZATION):
        path = comfy.resolve_model_file("diffusion_models", model_name)
        place = placement(offload)
        transformer = load_part("transformer", path, transformer_quantize, dtype=dtype, run_device=place.device).module
        return (KontextModel(transformer, scheduler_from(), place, source=f"diffusion_models/{model_name}"),)


class GIEVAELoader:
    DESCRIPTION = "Loads the FLUX VAE from a single file in models/vae (ae.safetensors, or a diffusers-layout file)."
    CATEGORY = CAT_LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The FLUX VAE.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": _choices(comfy.list_model_files("vae"), "The FLUX VAE file in models/vae, e.g. ae.safetensors."),
                "dtype": DTYPE_INPUT,
                "offload": OFFLOAD_INPUT,
            }
        }

    def load(self, vae_name, dtype, offload):
        vae = load_part("vae", comfy.resolve_model_file("vae", vae_name), dtype=dtype).module
        return (PlacedModel(vae, placement(offload), f"vae/{vae_name}"),)


class GIETextEncodersLoader:
    DESCRIPTION = (
        "Loads CLIP-L and T5-XXL from single files in models/text_encoders (clip_l, t5xxl fp16 or fp8), with "
        "tokenizers bundled with ComfyUI or taken from a FLUX diffusers folder."
    )
    CATEGORY = CAT_LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (TEXT_ENCODERS,)
    RETURN_NAMES = ("text_encoders",)
    OUTPUT_TOOLTIPS = ("CLIP-L (pooled vector) and T5-XXL (tokens; absent when t5_name is none).",)

    @classmethod
    def INPUT_TYPES(cls):
        files = comfy.list_model_files("text_encoders")
        return {
            "required": {
                "clip_name": _choices(files, "The CLIP-L text encoder file, e.g. clip_l.safetensors."),
                "t5_name": (
                    [NO_T5] + files,
                    {
                        "default": NO_T5,
                        "tooltip": "The T5-XXL encoder file, e.g. t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors; "
                        "none for the 'vlm' fusion mode, which needs CLIP only.",
                    },
                ),
                "tokenizers": (
                    [COMFY_TOKENIZERS] + comfy.list_model_dirs("diffusers"),
                    {
                        "default": COMFY_TOKENIZERS,
                        "tooltip": "Where the CLIP and T5 tokenizers come from: the copies bundled with ComfyUI, or a FLUX "
                        "diffusers folder (its tokenizer/ and tokenizer_2/).",
                    },
                ),
                "dtype": DTYPE_INPUT,
                "offload": OFFLOAD_INPUT,
            }
        }

    def load(self, clip_name, t5_name, tokenizers, dtype, offload):
        if tokenizers == COMFY_TOKENIZERS:
            dirs = comfy.bundled_tokenizer_dirs()
            if dirs is None:
                raise FileNotFoundError(
                    "ComfyUI's bundled tokenizers (comfy/sd1_tokenizer, comfy/text_encoders/t5_tokenizer) were not "
                    "found; choose a FLUX diffusers folder under tokenizers instead"
                )
            clip_tok, t5_tok = dirs
        else:
            root = comfy.resolve_model_dir("diffusers", tokenizers)
            clip_tok, t5_tok = root / "tokenizer", root / "tokenizer_2"
        clip = check_load("clip", comfy.resolve_model_file("text_encoders", clip_name), dtype=dtype, tokenizer_dir=clip_tok)
        t5 = None
        if t5_name != NO_T5:
            t5 = check_load("t5", comfy.resolve_model_file("text_encoders", t5_name), dtype=dtype, tokenizer_dir=t5_tok)
        text = load_text_encoders(clip, t5)
        return (PlacedModel(text, placement(offload), f"text_encoders/{clip_name}+{t5_name}"),)


class GIELoraLoader:
    DESCRIPTION = (
        "Applies a FLUX LoRA from models/loras to a Kontext model at a strength. The LoRA is loaded once as an "
        "adapter and switched on only while this model samples: the upstream model is left unchanged."
    )
    CATEGORY = CAT_LOADERS
    FUNCTION = "apply"
    RETURN_TYPES = (KONTEXT,)
    RETURN_NAMES = ("kontext_model",)
    OUTPUT_TOOLTIPS = ("The same Kontext model with this LoRA added to its LoRA list.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "kontext_model": (KONTEXT, {"tooltip": "The Kontext model to apply the LoRA to (chain loaders to stack LoRAs)."}),
                "lora_name": _choices(
                    comfy.list_model_files("loras"),
                    "A FLUX LoRA file in models/loras (diffusers/peft safetensors; kohya and BFL layouts are converted).",
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": LORA_STRENGTH_RANGE[0],
                        "max": LORA_STRENGTH_RANGE[1],
                        "step": 0.01,
                        "tooltip": "LoRA strength; 0 gives the base model exactly, negative values push away from it.",
                    },
                ),
            }
        }

    def apply(self, kontext_model, lora_name, strength):
        model = require(kontext_model, "kontext_model", "a Kontext model loader")
        strength = check_float("strength", strength, *LORA_STRENGTH_RANGE)
        transformer = model.require_transformer()
        name = load_part("lora", comfy.resolve_model_file("loras", lora_name), transformer=transformer).adapter
        return (model.with_lora(name, strength),)


class GIEQwenVLLoader:
    DESCRIPTION = (
        "Loads a Qwen2.5-VL text encoder from one file in models/text_encoders: the one gie-convert writes from a "
        "GPT-Image-Edit checkpoint, or the stock qwen_2.5_vl_7b file Qwen-Image users already have (the released "
        "model's Qwen is the stock one: gie-convert --compare-qwen checks). bf16, fp8 and scaled fp8 files."
    )
    CATEGORY = CAT_LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (QWEN_VL,)
    RETURN_NAMES = ("qwen_vl",)
    OUTPUT_TOOLTIPS = ("The Qwen2.5-VL encoder (image + instruction features; rewriting when it has its lm_head).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "qwen_name": _choices(
                    comfy.list_model_files("text_encoders"),
                    "A Qwen2.5-VL file in models/text_encoders (e.g. gpt-image-edit-qwen2.5-vl-bf16.safetensors or "
                    "qwen_2.5_vl_7b_fp8_scaled.safetensors).",
                ),
                "tokenizer": (
                    [COMFY_TOKENIZERS] + comfy.list_model_dirs(comfy.GIE_FOLDER),
                    {"default": COMFY_TOKENIZERS,
                     "tooltip": "Where the Qwen tokenizer comes from: ComfyUI's bundled Qwen2.5 tokenizer, or a "
                     "GPT-Image-Edit checkpoint folder in models/gpt_image_edit."},
                ),
                "lm_head": (
                    list(QWEN_LM_HEAD),
                    {"default": QWEN_LM_HEAD[0],
                     "tooltip": "The LM head (1 GB) is only needed by Rewrite Instruction. 'if present' loads it when "
                     "the file has it; 'never' saves the memory; 'required' fails early for a file without it."},
                ),
                "dtype": DTYPE_INPUT,
                "offload": OFFLOAD_INPUT,
            },
            "optional": {"qwen_quantize": _quant_input("qwen")},
        }

    def load(self, qwen_name, tokenizer, lm_head, dtype, offload, qwen_quantize=NO_QUANTIZATION):
        path = comfy.resolve_model_file("text_encoders", qwen_name)
        if tokenizer == COMFY_TOKENIZERS:
            tok_dir = comfy.bundled_qwen_tokenizer_dir()
            if tok_dir is None:
                raise ValueError(
                    "tokenizer: ComfyUI's bundled Qwen2.5 tokenizer (comfy/text_encoders/qwen25_tokenizer) was not "
                    "found; choose a GPT-Image-Edit checkpoint folder instead"
                )
        else:
            tok_dir = comfy.resolve_model_dir(comfy.GIE_FOLDER, tokenizer)
        head = {"if present": None, "never": False, "required": True}[lm_head]
        place = placement(offload)
        encoder = load_part("qwen", path, qwen_quantize, dtype=dtype, run_device=place.device, tokenizer_dir=tok_dir,
                            lm_head=head).module
        return (PlacedModel(encoder, place, f"text_encoders/{qwen_name}"),)


class GIEConnectorLoader:
    DESCRIPTION = (
        "Loads a fusion connector file from models/gie_connectors (gie-convert's, or one trained with gie-train), "
        "for the Fusion Connector node."
    )
    CATEGORY = CAT_LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (CONNECTOR,)
    RETURN_NAMES = ("connector",)
    OUTPUT_TOOLTIPS = ("The connector projecting Qwen-VL features into Kontext context tokens.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "connector_name": _choices(
                    comfy.list_model_files(comfy.CONNECTOR_FOLDER),
                    "A connector file in models/gie_connectors (remappable in extra_model_paths.yaml).",
                ),
                "dtype": DTYPE_INPUT,
                "offload": OFFLOAD_INPUT,
            }
        }

    def load(self, connector_name, dtype, offload):
        conn = load_part("connector", comfy.resolve_model_file(comfy.CONNECTOR_FOLDER, connector_name), dtype=dtype).module
        return (PlacedModel(conn, placement(offload), f"{comfy.CONNECTOR_FOLDER}/{connector_name}"),)


NODES = {
    "GIECheckpointLoader": (GIECheckpointLoader, "Checkpoint Loader (GPT-Image-Edit folder)"),
    "GIEKontextDiffusersLoader": (GIEKontextDiffusersLoader, "Kontext Loader (diffusers folder)"),
    "GIEKontextModelLoader": (GIEKontextModelLoader, "Kontext Model Loader (single file)"),
    "GIEVAELoader": (GIEVAELoader, "Kontext VAE Loader (single file)"),
    "GIETextEncodersLoader": (GIETextEncodersLoader, "T5 + CLIP Loader (single files)"),
    "GIELoraLoader": (GIELoraLoader, "Kontext LoRA Loader"),
    "GIEQwenVLLoader": (GIEQwenVLLoader, "Qwen2.5-VL Loader (single file)"),
    "GIEConnectorLoader": (GIEConnectorLoader, "Connector Loader (single file)"),
}
