"""The Kontext sampler: conditioning + reference image -> edited images."""

from __future__ import annotations

from gie_core.engine.acceleration import (
    ATTENTION_BACKENDS,
    CACHE_METHODS,
    CACHE_TABLE,
    DEFAULT_ATTENTION,
    NO_CACHE,
    cache_choice,
)
from gie_core.engine.conditioning import Conditioning
from gie_core.constants import (
    BATCH_RANGE,
    DEFAULT_GUIDANCE,
    DEFAULT_REFERENCE_METHOD,
    DEFAULT_REFERENCE_RESAMPLE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_TRUE_CFG,
    GUIDANCE_RANGE,
    MAX_IMAGE_SIDE,
    REFERENCE_METHODS,
    REFERENCE_RESAMPLE_MODES,
    REFERENCE_RESIZE_MODES,
    SEED_RANGE,
    SIZE_MULTIPLE,
    STEPS_RANGE,
    TRUE_CFG_RANGE,
)
from gie_core.imaging.images import prepare_reference
from gie_core.weights.lora import activated
from gie_core.engine.request import EditRequest, resolve_edit, resolve_output_size
from gie_core.engine.sampler import KontextModels, sample

from . import comfy
from .common import ANY_VAE, CAT_SAMPLING, KONTEXT, TURN_REFERENCES, TURN_SIZE, check_image, comfy_latents_in, require, vae_input


def read_conditioning(cond, name: str, transformer) -> Conditioning:
    """ComfyUI CONDITIONING (ours or native Flux) -> Conditioning, checked against the transformer."""
    if cond is None:
        raise ValueError(
            f"{name} conditioning is empty; connect Fusion Connector or T5 Encode (T5 Encode gives no "
            "conditioning when its text encoders were loaded without T5)"
        )
    try:
        c = Conditioning.from_comfy(cond)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    cfg = transformer.config
    if c.context.shape[-1] != cfg.joint_attention_dim:
        raise ValueError(
            f"{name} conditioning has {c.context.shape[-1]}-wide tokens but this Kontext transformer takes "
            f"{cfg.joint_attention_dim}-wide ones (is it from another model family?)"
        )
    if c.pooled.shape[-1] != cfg.pooled_projection_dim:
        raise ValueError(
            f"{name} conditioning has a {c.pooled.shape[-1]}-wide pooled vector but this Kontext transformer takes "
            f"{cfg.pooled_projection_dim} (CLIP-L)"
        )
    return c


# ComfyUI's FluxKontextMultiReferenceLatentMethod names are ours (REFERENCE_METHODS); "uxo" has no twin.
NATIVE_REFERENCE_METHOD = "offset"  # what native Flux does when the method node is not used


def native_reference_latents(cond: Conditioning) -> tuple[list | None, str]:
    """``reference_latents`` set by native ReferenceLatent, as Kontext references after ``image``.

    They are ComfyUI LATENTs (raw VAE latents), normalised here as native Flux does
    (``process_latent_in``: (z - shift) * scale), and placed by the method
    FluxKontextMultiReferenceLatentMethod set (``offset`` by default, as native Flux). With none,
    the image alone is the reference, at first id coordinate 1 (the GPT-Image-Edit reference)."""
    latents = cond.extra.get("reference_latents")
    method = cond.extra.get("reference_latents_method")
    if not latents:
        return None, DEFAULT_REFERENCE_METHOD
    if method is not None and method not in REFERENCE_METHODS:
        raise ValueError(
            f"positive: reference_latents_method '{method}' (from FluxKontextMultiReferenceLatentMethod) is not supported "
            f"by this sampler; use {' or '.join(REFERENCE_METHODS)}"
        )
    return [comfy_latents_in(lat) for lat in latents], method or NATIVE_REFERENCE_METHOD


def output_size(width: int, height: int, ref_width: int, ref_height: int) -> tuple[int, int]:
    """0 = auto: both 0 -> ~1 MP at the reference's aspect; one 0 -> follow the aspect
    (:func:`gie_core.engine.request.resolve_output_size`, the rule every face uses)."""
    return resolve_output_size(width, height, ref_width, ref_height)


class GIEKontextSampler:
    DESCRIPTION = (
        "Edits the reference image with FLUX.1 Kontext: denoises a new image conditioned on the positive "
        "conditioning (from Fusion Connector, T5 Encode or native Flux nodes) and the reference image's latents."
    )
    CATEGORY = CAT_SAMPLING
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The edited images [batch, height, width, 3].",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "kontext_model": (KONTEXT, {"tooltip": "The Kontext model (fine-tuned from the checkpoint loader, or stock)."}),
                "vae": (
                    ANY_VAE,
                    {"tooltip": "The FLUX VAE (encodes the reference, decodes the result): from a GIE loader, or "
                     "ComfyUI's own Load VAE on ae.safetensors."},
                ),
                "positive": (
                    "CONDITIONING",
                    {"tooltip": "What to do: Fusion Connector, T5 Encode, or native Flux conditioning. A guidance "
                     "value set by FluxGuidance overrides the guidance input. Latents added by native ReferenceLatent "
                     "are used as further Kontext references after `image` (placed side by side, or as "
                     "FluxKontextMultiReferenceLatentMethod says), as native Flux uses them. ConditioningCombine "
                     "(several entries) is refused: native samplers blend entries, this one does not."},
                ),
                "seed": (
                    "INT",
                    {"default": DEFAULT_SEED, "min": SEED_RANGE[0], "max": SEED_RANGE[1], "control_after_generate": True,
                     "tooltip": "Noise seed; the same seed gives the same image on any device."},
                ),
                "steps": ("INT", {"default": DEFAULT_STEPS, "min": STEPS_RANGE[0], "max": STEPS_RANGE[1],
                                  "tooltip": "Denoising steps."}),
                "guidance": (
                    "FLOAT",
                    {"default": DEFAULT_GUIDANCE, "min": GUIDANCE_RANGE[0], "max": GUIDANCE_RANGE[1], "step": 0.1,
                     "tooltip": "FLUX guidance embedding (distilled guidance), 2.5 to 4 is typical."},
                ),
                "width": (
                    "INT",
                    {"default": 0, "min": 0, "max": MAX_IMAGE_SIDE, "step": SIZE_MULTIPLE,
                     "tooltip": "Output width, a multiple of 16; 0 = auto (about 1 megapixel at the reference's aspect)."},
                ),
                "height": (
                    "INT",
                    {"default": 0, "min": 0, "max": MAX_IMAGE_SIDE, "step": SIZE_MULTIPLE,
                     "tooltip": "Output height, a multiple of 16; 0 = auto."},
                ),
                "batch_size": (
                    "INT",
                    {"default": 1, "min": BATCH_RANGE[0], "max": BATCH_RANGE[1],
                     "tooltip": "Images per reference image (with a batch of references: 1 or the batch's size)."},
                ),
                "reference_resize": (
                    list(REFERENCE_RESIZE_MODES),
                    {"default": "preferred",
                     "tooltip": "preferred: resize the reference to the nearest of Kontext's 17 training resolutions "
                     "(as the released model was run); keep: its own size, floored to a multiple of 16."},
                ),
                "unload_after": (
                    "BOOLEAN",
                    {"default": False,
                     "tooltip": "Move the transformer and VAE back to the CPU after this run to free GPU memory (the "
                     "next run moves them back)."},
                ),
            },
            "optional": {
                "image": (
                    "IMAGE",
                    {"tooltip": "The image to edit (Image 1); a batch edits each image. Leave it unconnected when "
                     "positive comes from GIE Conversation Turn: its conditioning carries every image of the "
                     "conversation."},
                ),
                "negative": (
                    "CONDITIONING",
                    {"tooltip": "Negative conditioning for true CFG (used only when true_cfg > 1)."},
                ),
                "image_2": (
                    "IMAGE",
                    {"tooltip": "Image 2 (the reference app's second image), a Kontext reference at its own size after "
                     "image; with width and height 0 the output size is the app's rule for two images (their mean "
                     "at ~1 MP)."},
                ),
                "true_cfg": (
                    "FLOAT",
                    {"default": DEFAULT_TRUE_CFG, "min": TRUE_CFG_RANGE[0], "max": TRUE_CFG_RANGE[1], "step": 0.1,
                     "tooltip": "True classifier-free guidance scale; 1 = off. Above 1 needs a negative and doubles the cost."},
                ),
                "reference_resample": (
                    list(REFERENCE_RESAMPLE_MODES),
                    {"default": DEFAULT_REFERENCE_RESAMPLE,
                     "tooltip": "How the reference is resized: lanczos (ours, as diffusers) or nearest (what upstream's "
                     "evaluation did, to reproduce the published numbers)."},
                ),
                "cache": (
                    [NO_CACHE, *CACHE_METHODS],
                    {"default": NO_CACHE,
                     "tooltip": "Step caching (diffusers' cache hooks): skips work in steps that barely change. Faster, "
                     "slightly different images. " + "; ".join(f"{m.name}: {m.title}" for m in CACHE_TABLE) + "."},
                ),
                "cache_value": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": max(m.high for m in CACHE_TABLE), "step": 0.01,
                     "tooltip": "The cache's one setting; 0 = its default. " + "; ".join(
                         f"{m.name}: {m.value_name} {m.low:g}..{m.high:g} (default {m.default:g})" for m in CACHE_TABLE)
                     + ". Higher = faster, further from the uncached image."},
                ),
                "attention": (
                    list(ATTENTION_BACKENDS),
                    {"default": DEFAULT_ATTENTION,
                     "tooltip": "Attention backend (diffusers' dispatcher). sdpa works everywhere; flash, flash3, sage, "
                     "cudnn and xformers need a CUDA GPU and their package, and fall back to sdpa (with a note in the "
                     "console) when missing."},
                ),
                "compile": (
                    "BOOLEAN",
                    {"default": False,
                     "tooltip": "torch.compile the repeated transformer blocks (regional compilation). The first run "
                     "compiles (slow), later runs gain; needs triton on GPUs. Kept on the loaded model."},
                ),
            },
        }

    # ``image`` stays the fourth parameter (callers pass it by position); it is optional, so the
    # widgets after it take their INPUT_TYPES defaults.
    def sample(self, kontext_model, vae, positive, image=None, seed=DEFAULT_SEED, steps=DEFAULT_STEPS,
               guidance=DEFAULT_GUIDANCE, width=0, height=0, batch_size=1, reference_resize="preferred",
               unload_after=False, negative=None, image_2=None, true_cfg=DEFAULT_TRUE_CFG,
               reference_resample=DEFAULT_REFERENCE_RESAMPLE, cache=NO_CACHE, cache_value=0.0,
               attention=DEFAULT_ATTENTION, compile=False):
        model = require(kontext_model, "kontext_model", "a Kontext model loader")
        codec, vae_ctx, vae_unload = vae_input(require(vae, "vae", "a Kontext loader's vae output or native Load VAE"))
        transformer = model.require_transformer()
        images = input_images(image, image_2)
        pos = read_conditioning(positive, "positive", transformer)
        ref_latents, ref_method = native_reference_latents(pos)
        check_references(images, pos, ref_latents)
        turn_size = pos.extra.get(TURN_SIZE)
        if not images and not (width or height) and turn_size:
            width, height = turn_size  # auto: the size the conversation turn chose by the app's rule
        if images:  # the size an automatic output follows
            first_w, first_h = images[0].shape[2], images[0].shape[1]
        elif ref_latents:
            first_w, first_h = 8 * ref_latents[0].shape[3], 8 * ref_latents[0].shape[2]
        else:  # a conversation turn without any image: text to image
            first_w, first_h = turn_size
        request = resolve_edit(
            image_width=first_w, image_height=first_h, n_images=images[0].shape[0] if images else 1, steps=steps,
            guidance=guidance, seed=seed, width=width, height=height, batch_size=batch_size, true_cfg=true_cfg,
            has_negative=negative is not None, reference_resize=reference_resize, reference_resample=reference_resample,
            reference_method=ref_method, cache=cache_choice(cache, cache_value), attention=attention,
            compile=bool(compile), more_images=[(im.shape[2], im.shape[1]) for im in images[1:]],
        )
        neg = read_conditioning(negative, "negative", transformer) if request.do_true_cfg else None
        check_conditioning_batch(pos, neg, request, batch_size)
        reference = [prepare_reference(im, request.reference_resize, resample=request.reference_resample) for im in images]
        progress, preview = comfy.step_callbacks(request.steps)
        try:
            with model.placement.use(transformer) as device, vae_ctx, activated(transformer, model.loras):
                out = sample(
                    KontextModels(transformer, codec, model.scheduler), pos, reference, request, negative=neg,
                    device=device, progress=progress, interrupt=comfy.interrupt_check(), preview=preview,
                    reference_latents=ref_latents,
                )
        finally:
            if unload_after:
                model.placement.unload(transformer)
                vae_unload()
        return (out.float().cpu(),)


def input_images(image, image_2) -> list:
    """The sampler's own input images, checked: Image 1, and Image 2 after it."""
    if image_2 is not None and image is None:
        raise ValueError("image_2 is connected but image is not; connect Image 1 first")
    return [check_image(im, name) for name, im in (("image", image), ("image_2", image_2)) if im is not None]


def check_references(images: list, positive: Conditioning, ref_latents) -> None:
    """The input images against what the positive conditioning already carries as references."""
    if positive.extra.get(TURN_REFERENCES) and images:
        raise ValueError(
            "positive comes from GIE Conversation Turn, which already gives every image of the conversation as a "
            "reference; leave image and image_2 unconnected (connect them to the turn instead)")
    if not images and not ref_latents and TURN_REFERENCES not in positive.extra:  # a turn may be text to image
        raise ValueError("image is not connected and positive carries no reference latents; connect the image to edit "
                         "(or GIE Conversation Turn's conditioning, or native ReferenceLatent)")


def check_conditioning_batch(pos: Conditioning, neg: Conditioning | None, request: EditRequest, batch_size: int) -> None:
    """Each conditioning is one shared entry or one per image the request makes."""
    for name, c in (("positive", pos), ("negative", neg)):
        if c is not None and c.batch_size not in (1, request.batch_size):
            raise ValueError(
                f"{name} conditioning has batch {c.batch_size} but {request.batch_size} images are being made "
                f"(image batch {request.n_images}, batch_size {batch_size}); encode with the same image batch"
            )


NODES = {"GIEKontextSampler": (GIEKontextSampler, "Kontext Sampler")}
