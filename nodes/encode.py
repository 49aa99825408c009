"""Encoders and the fusion connector: instruction (+ image) -> Kontext conditioning.

Outputs live on the CPU (they are cached between runs by ComfyUI and must not pin GPU memory).
``CONDITIONING`` outputs are ComfyUI's native list ``[[tokens, {"pooled_output": ...}]]``, so
native nodes (FluxGuidance, ReferenceLatent, KSampler with a Flux model) take them too.
"""

from __future__ import annotations

from gie_core.engine.connector import QwenFeatures, TextFeatures, fuse
from gie_core.engine.conditioning import Conditioning
from gie_core.engine.conversation import Conversation
from gie_core.engine.encoders import check_instruction
from gie_core.engine.modes import DEFAULT_FUSION_MODE, FUSION_MODES, fusion_mode, tooltip as modes_tooltip

from .common import (
    CAT_CONDITIONING,
    CONNECTOR,
    QWEN_FEATURES,
    QWEN_VL,
    ANY_TEXT_ENCODERS,
    TEXT_FEATURES,
    features_from_conditioning,
    is_native_clip,
    native_clip_features,
    check_image,
    require,
)

DEFAULT_INSTRUCTION = "Replace the sky with a warm sunset."


def instruction_input(tooltip: str) -> tuple:
    return ("STRING", {"default": DEFAULT_INSTRUCTION, "multiline": True, "tooltip": tooltip})


class GIEQwenVLEncode:
    DESCRIPTION = (
        "Encodes the image together with the edit instruction with Qwen2.5-VL, in the format GPT-Image-Edit was "
        "trained on (448x448 image first, then the instruction); feed the features to the Fusion Connector."
    )
    CATEGORY = CAT_CONDITIONING
    FUNCTION = "encode"
    RETURN_TYPES = (QWEN_FEATURES,)
    RETURN_NAMES = ("qwen_features",)
    OUTPUT_TOOLTIPS = ("Qwen2.5-VL last hidden states of every token [batch, tokens, 3584].",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "qwen_vl": (QWEN_VL, {"tooltip": "The Qwen2.5-VL encoder from the GPT-Image-Edit Checkpoint Loader."}),
                "image": ("IMAGE", {"tooltip": "The image to edit; a batch gives one feature set per image."}),
                "instruction": instruction_input("The edit instruction, e.g. 'make the car red'."),
            },
            "optional": {
                "connector": (
                    CONNECTOR,
                    {"tooltip": "Only for MetaQuery connectors: their learned queries join the Qwen input. Leave "
                     "unconnected for the released model."},
                ),
                "image_2": (
                    "IMAGE",
                    {"tooltip": "Image 2 (the reference app's second image): Qwen reads both, each at 448x448, e.g. "
                     "'put the jacket from image 2 on the person in image 1'. Give the sampler the same image_2."},
                ),
            },
        }

    def encode(self, qwen_vl, image, instruction, connector=None, image_2=None):
        qwen = require(qwen_vl, "qwen_vl", "the GPT-Image-Edit Checkpoint Loader's qwen_vl output")
        images = check_image(image)
        check_instruction(instruction)
        queries = getattr(connector.model, "queries", None) if connector is not None else None
        with qwen.use():
            if image_2 is None:
                feats = qwen.model.encode(images, instruction, queries=queries)
            else:  # a one-turn conversation of two images, rendered as the library (and the app) renders it
                if images.shape[0] != 1:
                    raise ValueError(f"image is a batch of {images.shape[0]} images; with image_2, encode one pair at a time")
                turn = Conversation().add_user(instruction, [images, check_image(image_2, "image_2")])
                feats = qwen.model.encode_conversation(turn, queries=queries)
        return (QwenFeatures(feats.hidden.cpu(), feats.num_queries),)


class GIET5Encode:
    DESCRIPTION = (
        "Encodes the instruction with T5-XXL (256 tokens) and CLIP-L (pooled) as FLUX.1 Kontext does. Outputs "
        "the text features for the Fusion Connector and the stock Kontext CONDITIONING."
    )
    CATEGORY = CAT_CONDITIONING
    FUNCTION = "encode"
    RETURN_TYPES = (TEXT_FEATURES, "CONDITIONING")
    RETURN_NAMES = ("text_features", "conditioning")
    OUTPUT_TOOLTIPS = (
        "T5 tokens and the CLIP pooled vectors of the instruction and of the empty prompt.",
        "Stock Kontext conditioning (T5 tokens + CLIP pooled), in ComfyUI's format; none without a T5 encoder.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoders": (
                    ANY_TEXT_ENCODERS,
                    {"tooltip": "CLIP-L and T5-XXL: from a GIE Kontext or T5 + CLIP loader, or ComfyUI's own "
                     "DualCLIPLoader (type flux, clip_l + t5xxl)."},
                ),
                "instruction": instruction_input("The edit instruction (the same text as for Qwen-VL Encode)."),
            }
        }

    def encode(self, text_encoders, instruction):
        feats = text_features(text_encoders, instruction)
        conditioning = Conditioning(feats.t5, feats.pooled).to_comfy() if feats.t5 is not None else None
        return (feats, conditioning)


def text_features(text_encoders, instruction: str) -> TextFeatures:
    """T5 tokens and CLIP pooled vectors of ``instruction`` (on the CPU) from a ``text_encoders``
    input: ours (a GIE loader's) or ComfyUI's own CLIP (DualCLIPLoader, type flux)."""
    text = require(text_encoders, "text_encoders", "a Kontext loader's text_encoders output or DualCLIPLoader")
    check_instruction(instruction)
    if is_native_clip(text):
        return native_clip_features(text, instruction)
    with text.use():
        feats = text.model.encode(instruction, with_t5=text.model.t5 is not None)
    return TextFeatures(
        feats.t5.cpu() if feats.t5 is not None else None,
        feats.pooled.cpu(),
        feats.pooled_empty.cpu() if feats.pooled_empty is not None else None,
    )


def _modes(**needs) -> list[str]:
    """The fusion modes whose table row has the given values (e.g. needs_t5=True)."""
    return [m for m in FUSION_MODES if all(getattr(fusion_mode(m), k) == v for k, v in needs.items())]


class GIEFusionConnector:
    DESCRIPTION = (
        "Fuses Qwen-VL features and T5 features into Kontext conditioning through the connector. vlm+t5 is the "
        "released model's mode; vlm uses Qwen-VL only; t5 is stock Kontext conditioning."
    )
    CATEGORY = CAT_CONDITIONING
    FUNCTION = "fuse"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Kontext conditioning in ComfyUI's format (also drives FluxGuidance, ReferenceLatent, KSampler).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "connector": (CONNECTOR, {"tooltip": "The fusion connector from the GPT-Image-Edit Checkpoint Loader."}),
                "mode": (
                    list(FUSION_MODES),
                    {"default": DEFAULT_FUSION_MODE, "tooltip": modes_tooltip()},
                ),
            },
            "optional": {
                "text_features": (
                    TEXT_FEATURES,
                    {"tooltip": "From T5 Encode. Every mode needs its CLIP pooled vector; the T5 tokens are used by "
                     f"{', '.join(_modes(needs_t5=True))} (for {', '.join(_modes(needs_t5=False))}, text encoders "
                     "loaded without T5 suffice)."},
                ),
                "qwen_features": (
                    QWEN_FEATURES,
                    {"tooltip": f"From Qwen-VL Encode; needed by {', '.join(_modes(needs_qwen=True))}."},
                ),
                "text_conditioning": (
                    "CONDITIONING",
                    {"tooltip": "Instead of text_features: native Flux text conditioning (CLIPTextEncode with a flux "
                     "DualCLIPLoader) of the instruction; its tokens are the T5 part, its pooled_output CLIP(instruction)."},
                ),
                "empty_conditioning": (
                    "CONDITIONING",
                    {"tooltip": "With text_conditioning: the same encoder's conditioning of an empty prompt; its pooled "
                     f"output is CLIP(''), which {', '.join(_modes(pooled_from='empty'))} need."},
                ),
            },
        }

    def fuse(self, connector, text_features=None, mode=DEFAULT_FUSION_MODE, qwen_features=None, text_conditioning=None,
             empty_conditioning=None):
        conn = require(connector, "connector", "the GPT-Image-Edit Checkpoint Loader's connector output")
        spec = fusion_mode(mode)
        if text_features is not None and text_conditioning is not None:
            raise ValueError("connect text_features or text_conditioning, not both")
        if text_features is None:
            if text_conditioning is None:
                raise ValueError(
                    "text_features is not connected; connect T5 Encode's text_features, or native text conditioning "
                    "(CLIPTextEncode with a flux CLIP) to text_conditioning"
                )
            if spec.pooled_from == "empty" and empty_conditioning is None:
                raise ValueError(
                    f"fusion mode '{mode}' uses CLIP('') as its pooled vector: connect empty_conditioning (CLIPTextEncode "
                    "of an empty prompt with the same CLIP)"
                )
            text_features = features_from_conditioning(text_conditioning, empty_conditioning)
        if spec.needs_qwen and qwen_features is None:
            raise ValueError(f"fusion mode '{mode}' needs qwen_features: connect Qwen-VL Encode (or use a mode without Qwen)")
        with conn.use():
            cond = fuse(mode, conn.model, qwen_features if spec.needs_qwen else None, text_features)
        return (cond.to("cpu").to_comfy(),)


NODES = {
    "GIEQwenVLEncode": (GIEQwenVLEncode, "Qwen-VL Encode"),
    "GIET5Encode": (GIET5Encode, "T5 Encode"),
    "GIEFusionConnector": (GIEFusionConnector, "Fusion Connector"),
}
