"""Instruction rewriting in front of the encoders, with the checkpoint's own Qwen2.5-VL."""

from __future__ import annotations

from gie_core.engine.encoders import check_instruction
from gie_core.engine.rewrite import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT, rewrite_instruction

from .common import CAT_CONDITIONING, QWEN_VL, check_image, require, ui_text
from .encode import instruction_input
from gie_core.constants import SEED_RANGE


class GIERewriteInstruction:
    DESCRIPTION = (
        "Rewrites a short edit instruction into an explicit one by looking at the image with the checkpoint's "
        "Qwen2.5-VL (Input / Edit / Output fields; the Edit field is used). Connect edit_instruction to the "
        "instruction inputs of Qwen-VL Encode and T5 Encode."
    )
    CATEGORY = CAT_CONDITIONING
    FUNCTION = "rewrite"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("edit_instruction", "rewrite")
    OUTPUT_TOOLTIPS = (
        "The rewritten instruction (the Edit field), or the original when the answer had no usable Edit field.",
        "The whole rewrite (Input, Edit, Output), or why the original was kept and the model's raw answer.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "qwen_vl": (QWEN_VL, {"tooltip": "The Qwen2.5-VL encoder from the GPT-Image-Edit Checkpoint Loader."}),
                "image": ("IMAGE", {"tooltip": "The image to be edited (a batch uses its first image)."}),
                "instruction": instruction_input("The user's edit instruction to rewrite."),
                "max_new_tokens": (
                    "INT",
                    {"default": DEFAULT_MAX_NEW_TOKENS, "min": 16, "max": MAX_NEW_TOKENS_LIMIT, "step": 16,
                     "tooltip": "Longest answer generated; a rewrite cut inside its Edit field falls back to the original."},
                ),
                "temperature": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05,
                     "tooltip": "0 = greedy (the same image and instruction always give the same rewrite); above 0 samples."},
                ),
                "top_p": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                     "tooltip": "Nucleus sampling cut-off, used only when temperature > 0."},
                ),
                "seed": (
                    "INT",
                    {"default": 0, "min": 0, "max": SEED_RANGE[1], "control_after_generate": True,
                     "tooltip": "Sampling seed, used only when temperature > 0."},
                ),
            }
        }

    def rewrite(self, qwen_vl, image, instruction, max_new_tokens, temperature, top_p, seed):
        qwen = require(qwen_vl, "qwen_vl", "the GPT-Image-Edit Checkpoint Loader's qwen_vl output")
        images = check_image(image)
        check_instruction(instruction)
        with qwen.use():
            result = rewrite_instruction(
                qwen.model, images, instruction, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                seed=int(seed), top_p=float(top_p),
            )
        return ui_text(result.full_text, (result.instruction, result.full_text))


NODES = {"GIERewriteInstruction": (GIERewriteInstruction, "Rewrite Instruction")}
