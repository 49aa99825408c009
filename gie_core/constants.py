"""One source of truth for the numbers the reference system fixes.

Nodes, the command line and the trainer import these; nothing else redefines them.
"""

from __future__ import annotations

# Aspect-ratio buckets the GPT-Image-Edit-1.5M data was generated at, as (width, height) ratios.
DEFAULT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (3, 2), (2, 3))

# The 17 resolutions FLUX.1 Kontext [dev] was trained on, as (width, height).
PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)

# Residual-padding filter of the paper: an output whose border still looks padded over this
# fraction is rejected.
RESIDUAL_PADDING_THRESHOLD = 0.005

# Qwen2.5-VL encoding in the reference format.
QWEN_IMAGE_SIZE = 448  # fixed square resize -> grid 1x32x32 -> 256 tokens after 2x2 merge

# T5 / CLIP text encoding.
T5_MAX_LENGTH = 256
CLIP_MAX_LENGTH = 77

# Published sampling defaults, and the range every face accepts (inclusive).
DEFAULT_GUIDANCE = 3.5
DEFAULT_STEPS = 28
DEFAULT_SEED = 42
DEFAULT_TRUE_CFG = 1.0  # 1.0 = off
STEPS_RANGE = (1, 200)
GUIDANCE_RANGE = (0.0, 100.0)
TRUE_CFG_RANGE = (1.0, 30.0)
SEED_RANGE = (0, 0xFFFFFFFFFFFFFFFF)  # ComfyUI's seed widget; torch generators take 64 bits
BATCH_RANGE = (1, 64)
MAX_SEEDS = 10000  # seeds of one list or range (gie-edit --seeds 1-100 and job lists)
LORA_STRENGTH_RANGE = (-10.0, 10.0)

# Output size when none is given: about one megapixel at the reference's aspect ratio.
DEFAULT_TARGET_AREA = 1024 * 1024
SIZE_MULTIPLE = 16
# An output may differ from the aspect it should keep (a padded image's) by this much; see
# gie_core.imaging.ratio.aspect_fits for the allowance of sizes in multiples of SIZE_MULTIPLE.
ASPECT_TOLERANCE = 0.01

# Inputs we accept as reference images.
MIN_IMAGE_SIDE = 16
MAX_IMAGE_SIDE = 4096

# FLUX VAE latent normalisation (ae.safetensors / FLUX.1 diffusers vae config).
FLUX_VAE_SCALING = 0.3611
FLUX_VAE_SHIFT = 0.1159

# Dynamic-shift constants of the FLUX scheduler.
BASE_IMAGE_SEQ_LEN = 256
MAX_IMAGE_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15

# Where models wait between uses (see gie_core.engine.components.Placement).
OFFLOAD_MODES: tuple[str, ...] = ("none", "model", "sequential")

# Fusion modes: the table is gie_core.engine.modes (FUSION_MODES, DEFAULT_FUSION_MODE live there).
METAQUERY_TOKENS = 256

# Reference images: how they are resized before VAE encoding. "lanczos" is ours (as diffusers'
# pipeline resizes PIL images); "nearest" is what upstream's evaluation scripts did, to
# reproduce the published numbers.
REFERENCE_RESIZE_MODES: tuple[str, ...] = ("preferred", "keep")
REFERENCE_RESAMPLE_MODES: tuple[str, ...] = ("lanczos", "nearest")
DEFAULT_REFERENCE_RESAMPLE = "lanczos"

# Images with transparency are composited on this colour (the pad colour when snapping).
DEFAULT_BACKGROUND = "white"
