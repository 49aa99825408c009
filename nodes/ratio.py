"""Pad to an aspect-ratio bucket before the edit, crop the padding after, check for leftovers."""

from __future__ import annotations

from gie_core.constants import RESIDUAL_PADDING_THRESHOLD
from gie_core.imaging.ratio import (
    PAD_COLORS,
    PLACEMENTS,
    RATIO_SETS,
    RESAMPLE_MODES,
    PadRecord,
    apply_padding,
    crop_padding,
    has_residual_padding,
    padding_mask,
)
from gie_core.engine.web_rules import DEFAULT_PLACEMENT, DEFAULT_RATIO_SET, plan_pad_to_ratio

from .common import CAT_IMAGE, PAD_RECORD, check_image, ui_text

FIXED_PAD_COLORS = tuple(c for c in PAD_COLORS if c != "edge")  # a residual check needs a fixed colour


class GIEPadToRatio:
    DESCRIPTION = (
        "Pads the image (never resizes it) to the nearest aspect ratio of a set, as GPT-Image-Edit's training "
        "data was made (1:1, 3:2, 2:3). Edit the padded image, then Crop Padding with the pad record."
    )
    CATEGORY = CAT_IMAGE
    FUNCTION = "pad"
    RETURN_TYPES = ("IMAGE", PAD_RECORD, "MASK")
    RETURN_NAMES = ("image", "pad_record", "mask")
    OUTPUT_TOOLTIPS = (
        "The padded image, exactly at the chosen ratio.",
        "Where the padding went; Crop Padding needs it to restore the original framing and size.",
        "1 on the padding, 0 on the original image.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image to pad (a batch shares one size, hence one pad record)."}),
                "ratios": (
                    list(RATIO_SETS),
                    {"default": DEFAULT_RATIO_SET,
                     "tooltip": "default: 1:1, 3:2, 2:3 (the training buckets); kontext: the ratios of Kontext's 17 "
                     "training resolutions."},
                ),
                "pad_color": (
                    list(PAD_COLORS),
                    {"default": "white", "tooltip": "Padding colour; edge repeats the border pixels."},
                ),
                "placement": (
                    list(PLACEMENTS),
                    {"default": DEFAULT_PLACEMENT, "tooltip": "Where the image sits inside the padded canvas."},
                ),
            },
            "optional": {
                "custom_ratios": (
                    "STRING",
                    {"default": "", "tooltip": "Overrides the ratio set when not empty, e.g. '1:1, 16:9, 9:16'."},
                ),
            },
        }

    def pad(self, image, ratios, pad_color, placement, custom_ratios=""):
        images = check_image(image)
        # the plan the web extension previews (GET /gie/pad_plan): a bad custom list fails here, naming the bad entry
        record = plan_pad_to_ratio(images.shape[2], images.shape[1], ratios, custom_ratios, placement)
        padded = apply_padding(images, record, color=pad_color)
        mask = padding_mask(record)[None].expand(images.shape[0], -1, -1).contiguous()  # [B, H, W]
        return (padded, record, mask)


class GIECropPadding:
    DESCRIPTION = (
        "Removes the padding Pad To Ratio added, from the edited image (any size with the padded aspect), and "
        "resizes the result back to the original image's size."
    )
    CATEGORY = CAT_IMAGE
    FUNCTION = "crop"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The image at the original size and framing.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The edited padded image."}),
                "pad_record": (PAD_RECORD, {"tooltip": "From the Pad To Ratio node that padded this image's input."}),
                "resample": (
                    list(RESAMPLE_MODES),
                    {"default": "lanczos", "tooltip": "How the crop is resized to the original size (exact crops are not resized)."},
                ),
            }
        }

    def crop(self, image, pad_record, resample):
        images = check_image(image)
        if not isinstance(pad_record, PadRecord):
            raise TypeError(f"pad_record must come from Pad To Ratio, not a {type(pad_record).__name__}")
        try:
            return (crop_padding(images, pad_record, resample=resample),)
        except ValueError as exc:
            raise ValueError(
                f"pad_record does not belong to this image: {exc}. Connect the pad record of the Pad To Ratio node "
                "whose padded image was edited into this one."
            ) from None


class GIEPaddingCheck:
    DESCRIPTION = (
        "Measures how much of the image's border still looks like padding (the paper's residual-padding filter: "
        "an edit fails above 0.5%). Use it on the cropped result."
    )
    CATEGORY = CAT_IMAGE
    FUNCTION = "check"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "BOOLEAN")
    RETURN_NAMES = ("residual_fraction", "passed")
    OUTPUT_TOOLTIPS = (
        "Fraction of the image covered by border strips that still look padded (batch maximum).",
        "True when the fraction is at most the threshold.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image to check (usually after Crop Padding)."}),
                "pad_color": (list(FIXED_PAD_COLORS), {"default": "white", "tooltip": "The padding colour to look for."}),
                "threshold": (
                    "FLOAT",
                    {"default": RESIDUAL_PADDING_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.001,
                     "tooltip": "Largest residual fraction that still passes (0.005 = the paper's 0.5%)."},
                ),
                "tolerance": (
                    "FLOAT",
                    {"default": 8.0, "min": 0.0, "max": 255.0, "step": 1.0,
                     "tooltip": "How far (0-255) a pixel may be from the padding colour and still count as padding."},
                ),
            }
        }

    def check(self, image, pad_color, threshold, tolerance):
        images = check_image(image)
        flagged, fraction = has_residual_padding(images, color=pad_color, threshold=threshold, tolerance=tolerance)
        verdict = "fail" if flagged else "pass"
        return ui_text(f"residual padding {fraction:.2%} ({verdict}, threshold {threshold:.2%})", (fraction, not flagged))


NODES = {
    "GIEPadToRatio": (GIEPadToRatio, "Pad To Ratio"),
    "GIECropPadding": (GIECropPadding, "Crop Padding"),
    "GIEPaddingCheck": (GIEPaddingCheck, "Padding Check"),
}
