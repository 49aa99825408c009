"""Loaders: every model comes from ComfyUI's model folders through a dropdown, never a typed path.

Weights load to the CPU; each part visits the device when a node uses it (see the ``offload``
input). ComfyUI caches node outputs, so a loaded model stays loaded between runs until its
inputs change.
"""

from __future__ import annotations

from gie_core.constants import LORA_STRENGTH_RANGE
from gie_core.engine.components import KontextModel, PlacedModel, default_scheduler, load_text_encoder_files
from gie_core.weights.loading import load_gie_checkpoint, load_kontext_dir, parse_dtype
from gie_core.weights.lora import load_lora
from gie_core.weights.gguf import is_gguf, load_gguf_transformer
from gie_core.weights.quantize import check_quantization, prepare_fp8_storage
from gie_core.checks import check_float
from gie_core.weights.single_file import load_bfl_transformer, load_bfl_vae, load_connector_file, load_qwen_file

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


def _qwen_load_device(qwen_quantize: str, place):
    """bitsandbytes weights cannot move after loading: they load where they run."""
    from gie_core.weights.quantize import quantization

    return place.device if quantization(qwen_quantize).kind == "bnb" else "cpu"


def _quant_input(part: str) -> tuple:
    """An optional dropdown of the part's weight storage (gie_core.weights.quantize's table)."""
    from gie_core.weights.quantize import QUANTIZATION_TABLE

    rows = [q for q in QUANTIZATION_TABLE if part in q.parts]
    return ([q.name for q in rows], {"default": "none", "tooltip": f"How the {part} weights are stored: "
            + "; ".join(f"{q.name}: {q.description}" for q in rows) + "."})
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

    def load(self, checkpoint, dtype, offload, transformer_quantize="none", qwen_quantize="none"):
        path = comfy.resolve_model_dir(comfy.GIE_FOLDER, checkpoint)
        place = placement(offload)
        check_quantization("transformer", transformer_quantize, place.device)
        check_quantization("qwen", qwen_quantize, place.device)
        ck = load_gie_checkpoint(path, dtype=parse_dtype(dtype), device=_qwen_load_device(qwen_quantize, place),
                                 transformer_quantize=transformer_quantize, qwen_quantize=qwen_quantize)
        kontext = KontextModel(ck.transformer, default_scheduler(), place, source=f"gpt_image_edit/{checkpoint}")
        return (
            PlacedModel(ck.encoder, place, f"gpt_image_edit/{checkpoint}"),
            PlacedModel(ck.connector, place, f"gpt_image_edit/{checkpoint}"),
            kontext,
        )


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

    def load(self, kontext, load_transformer, load_t5, dtype, offload, transformer_quantize="none"):
        path = comfy.resolve_model_dir("diffusers", kontext)
        check_quantization("transformer", transformer_quantize)
        parts = ["vae", "scheduler", "clip"] + (["transformer"] if load_transformer else []) + (["t5"] if load_t5 else [])
        comps = load_kontext_dir(path, dtype=parse_dtype(dtype), device="cpu", parts=tuple(parts),
                                 transformer_quantize=transformer_quantize)
        place = placement(offload)
        source = f"diffusers/{kontext}"
        return (
            KontextModel(comps.transformer, comps.scheduler, place, source=source),
            PlacedModel(comps.vae, place, source),
            PlacedModel(comps.text, place, source),
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

    def load(self, model_name, dtype, offload, transformer_quantize="none"):
        path = comfy.resolve_model_file("diffusion_models", model_name)
        check_quantization("transformer", transformer_quantize)
        if is_gguf(path):  # quantised by the file (Q4/Q5/Q8), dequantised per layer by diffusers
            transformer = load_gguf_transformer(path, dtype=parse_dtype(dtype), device="cpu")
        else:
            transformer = load_bfl_transformer(path, dtype=parse_dtype(dtype), device="cpu")
            if transformer_quantize == "fp8":
                prepare_fp8_storage(transformer, parse_dtype(dtype), "transformer")
        transformer.requires_grad_(False)
        return (KontextModel(transformer, default_scheduler(), placement(offload), source=f"diffusion_models/{model_name}"),)


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
        path = comfy.resolve_model_file("vae", vae_name)
        vae = load_bfl_vae(path, dtype=parse_dtype(dtype), device="cpu").requires_grad_(False)
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
        t5_path = None if t5_name == NO_T5 else comfy.resolve_model_file("text_encoders", t5_name)
        text = load_text_encoder_files(
            comfy.resolve_model_file("text_encoders", clip_name),
            t5_path,
            clip_tok,
            t5_tok,
            dtype=parse_dtype(dtype),
            device="cpu",
        )
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
        name = load_lora(transformer, comfy.resolve_model_file("loras", lora_name))
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

    def load(self, qwen_name, tokenizer, lm_head, dtype, offload, qwen_quantize="none"):
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
        check_quantization("qwen", qwen_quantize, place.device)
        if qwen_quantize not in ("none", "fp8"):
            raise ValueError(f"qwen_quantize '{qwen_quantize}' (bitsandbytes) needs the checkpoint folder loader; "
                             "a single Qwen file takes none or fp8")
        encoder = load_qwen_file(path, tokenizer_dir=tok_dir, dtype=parse_dtype(dtype), device="cpu", lm_head=head)
        if qwen_quantize == "fp8":
            prepare_fp8_storage(encoder.model, parse_dtype(dtype), "qwen")
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
        path = comfy.resolve_model_file(comfy.CONNECTOR_FOLDER, connector_name)
        conn = load_connector_file(path, dtype=parse_dtype(dtype), device="cpu")
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
