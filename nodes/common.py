"""What every node module shares: type names, categories, common inputs and input checks."""

from __future__ import annotations

import contextlib

import torch

from gie_core.engine.components import PlacedModel, Placement
from gie_core.engine.conditioning import Conditioning
from gie_core.engine.connector import TextFeatures
from gie_core.engine.sampler import latents_in, latents_out
from gie_core.imaging.images import to_tensor
from gie_core.constants import DTYPE_NAMES, LOAD_DEFAULTS, OFFLOAD_MODES

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
# Inputs that also take ComfyUI's own objects (a union type, as ComfyUI's validation allows):
ANY_VAE = f"{VAE},VAE"  # ours, or native Load VAE on ae.safetensors
ANY_TEXT_ENCODERS = f"{TEXT_ENCODERS},CLIP"  # ours, or native DualCLIPLoader (type flux: clip_l + t5xxl)
QWEN_FEATURES = "GIE_QWEN_FEATURES"  # connector.QwenFeatures
TEXT_FEATURES = "GIE_TEXT_FEATURES"  # connector.TextFeatures
PAD_RECORD = "GIE_PAD_RECORD"  # ratio.PadRecord
CONVERSATION = "GIE_CONVERSATION"  # conversation.Conversation (immutable: each turn gives a new one)
TASK_HEAD = "GIE_TASK_HEAD"  # taskhead.TaskHead (the generate-or-answer head, float32 on the CPU)
# The conditioning key GIE Conversation Turn sets: every image of the conversation is in its
# reference_latents, so GIE Kontext Sampler takes no image of its own beside them.
TURN_REFERENCES = "gie_conversation_references"
TURN_SIZE = "gie_output_size"  # (width, height) by the app's rule, what the sampler makes when width/height are 0

# The defaults are the nodes' row of gie_core.constants.LOAD_DEFAULTS (its reason says why).
DTYPE_INPUT = (
    list(DTYPE_NAMES),
    {
        "default": LOAD_DEFAULTS["nodes"].dtype,
        "tooltip": "Weights precision: bf16 (recommended on GPUs), fp16, or fp32 (CPU, debugging; twice the memory).",
    },
)

OFFLOAD_INPUT = (
    list(OFFLOAD_MODES),
    {
        "default": LOAD_DEFAULTS["nodes"].offload,
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


def comfy_latents_in(raw: torch.Tensor) -> torch.Tensor:
    """A ComfyUI LATENT (raw VAE latents; [B, C, 1, h, w] from newer builds) normalised as native
    Flux's ``process_latent_in`` does: [B, C, h, w] in the transformer's latent space."""
    if raw.ndim == 5:
        raw = raw[:, :, 0]
    return latents_in(raw.float())


class NativeVAE:
    """ComfyUI's own VAE (``comfy.sd.VAE`` from Load VAE) as the sampler's latent codec.

    ComfyUI's VAE takes images [B, H, W, C] in 0..1 and gives raw latents (the mode of the
    posterior, as ours); FLUX's latent normalisation ((z - shift) * scale, what native Flux's
    ``process_latent_in`` applies) is done here. ComfyUI manages its device and memory itself.
    """

    downscale_factor = 8

    def __init__(self, vae):
        self.vae = vae

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1).cpu()  # [B, H, W, 3]
        return comfy_latents_in(self.vae.encode(pixels))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents_out(latents.float().cpu()))
        if images.ndim == 5:
            images = images[:, 0]
        return images.float().clamp(0, 1)


def is_native_clip(obj) -> bool:
    return callable(getattr(obj, "tokenize", None)) and callable(getattr(obj, "encode_from_tokens", None))


def vae_input(vae):
    """(latent codec, context manager, unload function) for a ``vae`` input: ours (a placed
    diffusers VAE) or ComfyUI's own."""
    if isinstance(vae, PlacedModel):
        return vae.model, vae.use(), vae.unload
    if callable(getattr(vae, "encode", None)) and callable(getattr(vae, "decode", None)) and hasattr(vae, "first_stage_model"):
        return NativeVAE(vae), contextlib.nullcontext(), lambda: None
    raise TypeError(f"vae must come from a GIE VAE loader or ComfyUI's Load VAE, not a {type(vae).__name__}")


def native_clip_features(clip, instruction: str):
    """:class:`gie_core.engine.connector.TextFeatures` from ComfyUI's own CLIP object (DualCLIPLoader,
    type flux: clip_l + t5xxl): T5 tokens and CLIP-L pooled of the instruction, and CLIP-L
    pooled of "" (what the vlm and metaquery modes use).

    ComfyUI pads T5 to at least 256 tokens with no attention mask, as the reference does; it
    does not truncate, so an instruction over 256 T5 tokens gives more tokens than the
    reference's 256 (which cuts it)."""
    def encode(text: str):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return cond, pooled

    t5, pooled = encode(instruction)
    _, pooled_empty = encode("")
    return TextFeatures(t5.float().cpu(), pooled.float().cpu(), pooled_empty.float().cpu())


def features_from_conditioning(cond, empty=None, name: str = "text_conditioning"):
    """TextFeatures from native CONDITIONING (e.g. CLIPTextEncode with a flux CLIP): its tokens
    are the T5 part and its ``pooled_output`` CLIP(instruction); ``empty`` (the same encoder's
    conditioning of "") gives CLIP("") for the vlm and metaquery modes."""
    try:
        c = Conditioning.from_comfy(cond)
        e = Conditioning.from_comfy(empty) if empty is not None else None
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return TextFeatures(c.context, c.pooled, e.pooled if e is not None else None)
