"""One source of truth for the numbers the reference system fixes.

Nodes, the command line and the trainer import these; nothing else redefines them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
# Several references: "index" gives reference i the first id coordinate i+1; "offset" keeps 1
# and places them side by side (ComfyUI's FluxKontextMultiReferenceLatentMethod, same names).
REFERENCE_METHODS: tuple[str, ...] = ("index", "offset")
DEFAULT_REFERENCE_METHOD = "index"

# Images with transparency are composited on this colour (the pad colour when snapping).
DEFAULT_BACKGROUND = "white"

# Weight dtypes by the names every door offers (the CLIs' --dtype, the nodes' dtype dropdown,
# the library's dtype=), as torch attribute names (this module stays importable without torch;
# gie_core.weights.loading.parse_dtype turns them into torch dtypes). The trainer's
# train.mixed_precision names the same dtypes its own way: "no" is full precision.
DTYPE_TABLE: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPE_TABLE)
MIXED_PRECISION_DTYPES: dict[str, str] = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
AUTO_DTYPE = "auto"  # bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are slow and fp16 ones missing)


@dataclass(frozen=True)
class DoorDefaults:
    """The loading defaults of one door (a way in: the library, the CLI, the nodes, the trainer)."""

    door: str
    dtype: str  # a DTYPE_NAMES name, or AUTO_DTYPE
    offload: str  # an OFFLOAD_MODES name
    reason: str


# One default per choice and door; where doors differ, the reason is here, once.
LOAD_DEFAULTS: dict[str, DoorDefaults] = {
    d.door: d
    for d in (
        DoorDefaults("library", "bf16", "none",
                     "EditPipeline.from_paths / load_part: bf16 halves the memory of fp32 and is what the weights "
                     "were trained in; a program picks its own offload"),
        DoorDefaults("cli", AUTO_DTYPE, "none",
                     "gie-* commands run on whatever machine they find: 'auto' is bf16 on a GPU and fp32 on the CPU "
                     "(bf16 matmuls are slow there); everything stays on the device unless --offload says otherwise"),
        DoorDefaults("nodes", "bf16", "model",
                     "ComfyUI users run on GPUs beside other models: bf16, and each part visits the GPU only while "
                     "it is in use so ComfyUI can keep its own models resident"),
        DoorDefaults("trainer", "bf16", "none",
                     "train.mixed_precision: bf16 compute with fp32 trained weights (the reference recipe); the "
                     "trainer places the parts itself (memory.* options), it has no offload"),
    )
}

# Conversations, answers and the task head: the reference app (app.py / univa/serve/cli.py of
# wyhlovecpp/GPT-Image-Edit), see gie_core.engine.conversation and gie_core.engine.taskhead.
MAX_IMAGES_PER_TURN = 2  # the app's Image 1 and optional Image 2 (reference)
# Ours: every image of a conversation is a Kontext condition image (~4k tokens each at 1 MP), so
# a long conversation would grow without bound; the app has no limit.
MAX_CONVERSATION_IMAGES = 8
ANSWER_MAX_NEW_TOKENS = 128  # the app's answers: greedy, max_new_tokens=128
ANSWER_MAX_NEW_TOKENS_RANGE = (1, 4096)
# What a turn does: "auto" asks the task head (edit when there is none), or force one (the app's
# "Enhance Generation" / "Enhance Understanding" switches).
ROUTE_MODES: tuple[str, ...] = ("auto", "edit", "answer")
DEFAULT_ROUTE = "auto"
# The shipped task head's file beside the checkpoint (a torch pickle, read with weights_only=True)
# and the safetensors file gie-convert writes from it (preferred when both are there).
TASK_HEAD_PT = "task_head_final.pt"
TASK_HEAD_SAFETENSORS = "task_head.safetensors"
TASK_HEAD_TOKEN = "assistant"  # the head reads the last hidden state at this token (id 77091 in Qwen2.5)
# Output size of a turn with several images: the mean of their sizes at the nearest of these
# ratios, about this many pixels (the app's dynamic_resize(h, w, 'any_11ratio', anchor_pixels=1024*1024)).
MULTI_IMAGE_RATIOS: tuple[tuple[int, int], ...] = (
    (16, 9), (9, 16), (7, 5), (5, 7), (5, 4), (4, 5), (4, 3), (3, 4), (3, 2), (2, 3), (1, 1))
MULTI_IMAGE_ANCHOR_PIXELS = 1024 * 1024
MULTI_IMAGE_STRIDE = 32
# The conversation file gie-edit --conversation reads and writes.
CONVERSATION_FORMAT = "gpt-image-edit-conversation"
CONVERSATION_VERSION = 1
CONVERSATION_MODEL = "qwen2.5-vl"  # the prompt protocol a conversation is rendered in
# How a user turn's parts are ordered: "app" (text, then the images: app.py and serve/cli.py) or
# "edit" (images, then text: the evaluation scripts' and training data's one-image prompt).
CONVERSATION_LAYOUTS: tuple[str, ...] = ("app", "edit")
DEFAULT_CONVERSATION_LAYOUT = "app"
# A conversation turn with no image anywhere is text to image, at the app's default Height/Width.
TEXT_TO_IMAGE_SIZE = (1024, 1024)
