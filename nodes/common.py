"""What every node module shares: type names, categories, common inputs and input checks."""

from __future__ import annotations

import torch

from gie_core.components import Placement
from gie_core.images import to_tensor
from gie_core.loading import DTYPES
from gie_core.constants import OFFLOAD_MODES

from . import comfy

CATEGORY = "GPT-Image-Edit"
CAT_LOADERS = f"{CATEGORY}/loaders"
CAT_CONDITIONING = f"{CATEGORY}/conditioning"
CAT_SAMPLING = f"{CATEGORY}/sampling"
CAT_IMAGE = f"{CATEGORY}/image"

# Our custom socket types (a ComfyUI type is just a name both ends agree on).
QWEN_VL = "GIE_QWEN_VL"  # components.PlacedModel(encoders.QwenVLEncoder)
CONNECTOR = "GIE_CONNECTOR"  # components.PlacedModel(connector.Connector)
KONTEXT = "GIE_KONTEXT"  # components.KontextModel (transformer + scheduler + placement + LoRAs)
VAE = "GIE_VAE"  # components.PlacedModel(diffusers AutoencoderKL)
TEXT_ENCODERS = "GIE_TEXT_ENCODERS"  # components.PlacedModel(encoders.TextEncoders: CLIP-L, T5-XXL)
QWEN_FEATURES = "GIE_QWEN_FEATURES"  # connector.QwenFeatures
TEXT_FEATURES = "GIE_TEXT_FEATURES"  # connector.TextFeatures
PAD_RECORD = "GIE_PAD_RECORD"  # ratio.PadRecord

DTYPE_INPUT = (
    list(DTYPES),
    {
        "default": "bf16",
        "tooltip": "Weights precision: bf16 (recommended on GPUs), fp16, or fp32 (CPU, debugging; twice the memory).",
    },
)

OFFLOAD_INPUT = (
    list(OFFLOAD_MODES),
    {
        "default": "model",
        "tooltip": (
            "Where the weights wait between uses. none: stay on the GPU after the first run (fastest; "
            "needs memory for every part at once, e.g. 80 GB cards). model: visit the GPU only while "
            "in use. sequential: as model, and the transformer streams its blocks to the GPU one at a "
            "time (24 GB cards)."
        ),
    },
)


def placement(offload: str) -> Placement:
    """A placement on ComfyUI's device with ComfyUI's memory hooks (plain ones without it)."""
    return Placement(comfy.torch_device(), offload, make_room=comfy.make_room, empty_cache=comfy.empty_cache)


def check_image(image, name: str = "image") -> torch.Tensor:
    """A ComfyUI IMAGE: float [B, H, W, 3] in 0..1, every side within the model's limits."""
    if not torch.is_tensor(image):
        raise TypeError(f"{name} must be a ComfyUI IMAGE tensor [batch, height, width, 3], not {type(image).__name__}")
    if image.ndim != 4 or image.shape[-1] != 3 or image.shape[0] < 1:
        raise ValueError(
            f"{name} has shape {list(image.shape)} but an IMAGE must be [batch, height, width, 3] "
            "(RGB; convert images with an alpha channel or a mask first)"
        )
    return to_tensor(image, name)


def require(value, name: str, what: str):
    """A required object input (a loaded model) must be connected and of the right kind."""
    if value is None:
        raise ValueError(f"{name} is not connected; connect {what}")
    return value


def ui_text(text: str, result: tuple) -> dict:
    """A node result that also shows ``text`` on the node (the executed message's ``text``)."""
    return {"ui": {"text": [text]}, "result": result}
