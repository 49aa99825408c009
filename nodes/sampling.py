"""The Kontext sampler: conditioning + reference image -> edited images."""

from __future__ import annotations

from gie_core.conditioning import Conditioning
from gie_core.constants import DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS, DEFAULT_TRUE_CFG, MAX_IMAGE_SIDE, SIZE_MULTIPLE
from gie_core.images import auto_output_size, check_output_size, prepare_reference
from gie_core.lora import activated
from gie_core.sampler import KontextModels, sample

from . import comfy
from .common import CAT_SAMPLING, KONTEXT, VAE, check_image, require

MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed range
MAX_BATCH = 64
REFERENCE_RESIZE = ("preferred", "keep")


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


def output_size(width: int, height: int, ref_width: int, ref_height: int) -> tuple[int, int]:
    """0 = auto: both 0 -> ~1 MP at the reference's aspect; one 0 -> follow the aspect."""
    if width == 0 and height == 0:
        return auto_output_size(ref_width, ref_height)
    if width == 0:
        width = max(SIZE_MULTIPLE, round(height * ref_width / ref_height / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    elif height == 0:
        height = max(SIZE_MULTIPLE, round(width * ref_height / ref_width / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    check_output_size(int(width), int(height))
    return int(width), int(height)


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
                "vae": (VAE, {"tooltip": "The FLUX VAE (encodes the reference, decodes the result)."}),
                "positive": (
                    "CONDITIONING",
                    {"tooltip": "What to do: Fusion Connector, T5 Encode, or native Flux conditioning. A guidance "
                     "value set by FluxGuidance overrides the guidance input."},
                ),
                "image": ("IMAGE", {"tooltip": "The reference image to edit; a batch edits each image."}),
                "seed": (
                    "INT",
                    {"default": DEFAULT_SEED, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                     "tooltip": "Noise seed; the same seed gives the same image on any device."},
                ),
                "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 200, "tooltip": "Denoising steps."}),
                "guidance": (
                    "FLOAT",
                    {"default": DEFAULT_GUIDANCE, "min": 0.0, "max": 100.0, "step": 0.1,
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
                    {"default": 1, "min": 1, "max": MAX_BATCH,
                     "tooltip": "Images per reference image (with a batch of references: 1 or the batch's size)."},
                ),
                "reference_resize": (
                    list(REFERENCE_RESIZE),
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
                "negative": (
                    "CONDITIONING",
                    {"tooltip": "Negative conditioning for true CFG (used only when true_cfg > 1)."},
                ),
                "true_cfg": (
                    "FLOAT",
                    {"default": DEFAULT_TRUE_CFG, "min": 1.0, "max": 30.0, "step": 0.1,
                     "tooltip": "True classifier-free guidance scale; 1 = off. Above 1 needs a negative and doubles the cost."},
                ),
            },
        }

    def sample(self, kontext_model, vae, positive, image, seed, steps, guidance, width, height, batch_size,
               reference_resize, unload_after, negative=None, true_cfg=DEFAULT_TRUE_CFG):
        model = require(kontext_model, "kontext_model", "a Kontext model loader")
        vae = require(vae, "vae", "a Kontext loader's vae output")
        transformer = model.require_transformer()
        images = check_image(image)
        pos = read_conditioning(positive, "positive", transformer)
        neg = None
        if true_cfg > 1.0:
            if negative is None:
                raise ValueError(f"true_cfg is {true_cfg} but no negative conditioning is connected (1 turns true CFG off)")
            neg = read_conditioning(negative, "negative", transformer)

        n_images = images.shape[0]
        if n_images > 1 and batch_size not in (1, n_images):
            raise ValueError(
                f"image is a batch of {n_images} but batch_size is {batch_size}; with a batch of references use "
                f"batch_size 1 (one edit per image) or {n_images}"
            )
        total = n_images if n_images > 1 else batch_size
        for name, c in (("positive", pos), ("negative", neg)):
            if c is not None and c.batch_size not in (1, total):
                raise ValueError(
                    f"{name} conditioning has batch {c.batch_size} but {total} images are being made "
                    f"(image batch {n_images}, batch_size {batch_size}); encode with the same image batch"
                )
        out_w, out_h = output_size(width, height, images.shape[2], images.shape[1])
        reference = prepare_reference(images, reference_resize)

        try:
            with model.placement.use(transformer) as device, vae.use(), activated(transformer, model.loras):
                out = sample(
                    KontextModels(transformer, vae.model, model.scheduler),
                    pos,
                    reference,
                    width=out_w,
                    height=out_h,
                    steps=steps,
                    guidance=guidance,
                    seed=seed,
                    batch_size=total,
                    true_cfg=true_cfg,
                    negative=neg,
                    device=device,
                    progress=comfy.progress(steps),
                    interrupt=comfy.interrupt_check(),
                )
        finally:
            if unload_after:
                model.placement.unload(transformer)
                vae.unload()
        return (out.float().cpu(),)


NODES = {"GIEKontextSampler": (GIEKontextSampler, "Kontext Sampler")}
