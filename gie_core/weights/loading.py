"""Loading the weights users have, from local paths only.

- the released GPT-Image-Edit checkpoint directory (``UnivaQwen2p5VL`` layout), split into the
  Qwen2.5-VL encoder, the connector and the fine-tuned Kontext transformer, streamed tensor by
  tensor on any current transformers (old ``visual.*`` / ``model.*`` names are mapped);
- a FLUX.1-Kontext-dev diffusers directory;
- a stock Qwen2.5-VL transformers directory;
- connector files (ours, ``gie-convert``'s, the trainer's) and the released connector.

This is the low layer: callers name a part and a source through :mod:`gie_core.weights.parts`,
which checks every choice and dispatches here. Single-file checkpoints as ComfyUI users keep
them are in :mod:`gie_core.weights.single_file`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gie_core.constants import DTYPE_TABLE, MIXED_PRECISION_DTYPES, T5_MAX_LENGTH
from gie_core.engine.connector import Connector
from gie_core.engine.encoders import QwenVLEncoder, TextEncoders, load_qwen_image_processor, torchvision_available
from gie_core.weights.fp8_compute import fp8_compute_converters, prepare_fp8_compute
from gie_core.weights.quantize import bnb_config, prepare_fp8_storage, storage
from gie_core.weights.reader import CheckpointError, CheckpointReader, empty_weights, stream_weights

DTYPES = {name: getattr(torch, attr) for name, attr in DTYPE_TABLE.items()}

GIE_PROJECTOR_PREFIX = "denoise_tower.denoise_projector."
GIE_DENOISER_PREFIX = "denoise_tower.denoiser."
_GIE_NON_QWEN_PREFIX = "denoise_tower."


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' warnings while it reads the released config's flat pre-4.52 fields
    (understood correctly, but logged about at length)."""
    from transformers.utils import logging as hf_logging  # start-up: transformers (~1 s)

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'fp16' / 'fp32' (or a torch dtype; or the trainer's mixed-precision name "no")
    -> torch dtype (:data:`gie_core.constants.DTYPE_TABLE`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower()
    try:
        return DTYPES[MIXED_PRECISION_DTYPES.get(name, name)]
    except KeyError:
        raise ValueError(f"dtype '{dtype}' is unknown; expected one of {', '.join(DTYPES)}") from None


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not {what}: it has no {path.name}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def _check_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{what} must be a directory but {p} is a file")
    return p


# --------------------------------------------------------------------------------------
# The released GPT-Image-Edit checkpoint
# --------------------------------------------------------------------------------------


def gie_config(path: str | os.PathLike) -> dict:
    """config.json of a GPT-Image-Edit checkpoint directory, checked to be one."""
    p = _check_dir(path, "GPT-Image-Edit checkpoint directory")
    cfg = _read_json(p / "config.json", "a GPT-Image-Edit checkpoint directory")
    tower = cfg.get("denoise_tower")
    if not isinstance(tower, dict) or "denoiser_config" not in tower:
        raise CheckpointError(
            f"{p} is not a GPT-Image-Edit checkpoint directory: its config.json has no denoise_tower "
            f"(model_type '{cfg.get('model_type', cfg.get('_class_name', '?'))}'); "
            "a FLUX.1-Kontext diffusers directory goes to the Kontext loader instead"
        )
    return cfg


def qwen_config_from_gie(cfg: dict):
    """A transformers Qwen2_5_VLConfig from the checkpoint's flat (pre-4.52) fields."""
    from transformers import Qwen2_5_VLConfig  # start-up: transformers (~1 s)

    fields = {k: v for k, v in cfg.items() if k not in ("denoise_tower", "architectures", "model_type", "auto_map", "_name_or_path")}
    fields.pop("torch_dtype", None)
    fields.pop("dtype", None)
    with quiet_transformers():
        config = Qwen2_5_VLConfig(**fields)
    config._attn_implementation = "sdpa"
    return config


def map_qwen_key(key: str, model_keys: set[str]) -> str | None:
    """Map a checkpoint key (pre-4.52 ``visual.*`` / ``model.*`` or the current layout) to the
    model's parameter name; None when the model has no such parameter."""
    if key in model_keys:
        return key
    candidates = []
    if key.startswith("visual."):
        candidates.append("model." + key)
    elif key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        candidates.append("model.language_model." + key[len("model."):])
    elif key.startswith("model.visual."):  # current layout into an old-layout model
        candidates.append(key[len("model."):])
    elif key.startswith("model.language_model."):
        candidates.append("model." + key[len("model.language_model."):])
    for c in candidates:
        if c in model_keys:
            return c
    return None


def released_qwen_key(key: str) -> str:
    """The inverse of :func:`map_qwen_key`: a current transformers Qwen2.5-VL key in the
    pre-4.52 naming of the released checkpoint (``visual.*``, ``model.*``, ``lm_head.*``)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key == "lm_head.weight" or key.startswith(("model.", "visual.")):  # already the old naming
        return key
    raise ValueError(f"'{key}' is not a Qwen2.5-VL parameter name")


class OnDemandLMHead(torch.nn.Module):
    """Qwen's output head (``lm_head``, 545 M parameters, 1 GB in bf16), read from the checkpoint
    the first time something generates text (instruction rewriting), never for encoding.

    Until then it holds no weight; after, it is a plain bias-free linear layer whose weight
    moves with the model (offloading) like any other."""

    def __init__(self, in_features: int, out_features: int, read_weight):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._read_weight = read_weight  # () -> tensor [out_features, in_features]
        self.weight = None

    @property
    def loaded(self) -> bool:
        return self.weight is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            # in the activations' dtype: the rest of the model may have been cast since loading
            weight = self._read_weight().to(device=hidden.device, dtype=hidden.dtype)
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
        return torch.nn.functional.linear(hidden, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, loaded={self.loaded}"


def _read_lm_head(path: Path, key: str):
    def read():
        with CheckpointReader.open(path) as reader:
            return reader.read(key)

    return read


def load_qwen_from_gie(
    path: Path, cfg: dict, reader: CheckpointReader, dtype: torch.dtype, device, *, quantize: str = "none",
    lm_head: bool = False,
):
    """The Qwen2.5-VL part of the checkpoint as ``Qwen2_5_VLForConditionalGeneration``.

    ``lm_head`` False (default): the output head is read only when text is generated (see
    :class:`OnDemandLMHead`); encoding never needs it. ``quantize``: a row of
    :data:`gie_core.weights.quantize.STORAGE_TABLE` ("fp8" streams straight into float8 storage;
    "int8"/"nf4" load through bitsandbytes)."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # start-up: transformers' models (~4 s)

    q = storage(quantize)
    if q.method == "bnb":
        return _load_qwen_bnb(path, cfg, dtype, device, quantize, lm_head)
    config = qwen_config_from_gie(cfg)
    with empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(config)
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "text_config", None), "tie_word_embeddings", False))
    lazy_head = not lm_head and not tied and "lm_head.weight" in reader
    if lazy_head:
        head = model.lm_head
        model.lm_head = OnDemandLMHead(head.in_features, head.out_features, _read_lm_head(path, "lm_head.weight"))
    if q.method == "layerwise":
        prepare_fp8_storage(model, dtype, "qwen", q.store)
    model_keys = set(model.state_dict())

    keys = [k for k in reader.keys() if not k.startswith(_GIE_NON_QWEN_PREFIX) and not (lazy_head and k == "lm_head.weight")]
    names = {}
    for key in keys:
        names[key] = map_qwen_key(key, model_keys)
        if names[key] is None:
            raise CheckpointError(f"{path}: tensor '{key}' does not belong to a Qwen2.5-VL model")
    stream_weights(model, reader, names, dtype=dtype, device=device, what=f"Qwen2.5-VL weights in {path}")
    if tied:
        model.tie_weights()
    return model.eval().requires_grad_(False)


def _load_qwen_bnb(path: Path, cfg: dict, dtype: torch.dtype, device, quantize: str, lm_head: bool):
    """Qwen2.5-VL quantised by bitsandbytes while transformers loads it (its own loader reads
    the released names and ignores the ``denoise_tower.*`` tensors)."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # start-up: transformers' models (~4 s)

    device = torch.device(device)
    with quiet_transformers():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, config=qwen_config_from_gie(cfg), quantization_config=bnb_config(quantize, dtype),
            device_map={"": str(device)}, local_files_only=True, use_safetensors=True, **_dtype_kwarg(Qwen2_5_VLForConditionalGeneration, dtype),
        )
    if not lm_head and isinstance(model.lm_head, torch.nn.Linear) and not getattr(model.config, "tie_word_embeddings", False):
        head = model.lm_head  # transformers reads it with the rest; free it until something generates
        model.lm_head = OnDemandLMHead(head.in_features, head.out_features, _read_lm_head(path, "lm_head.weight"))
        del head
    model._gie_quantization = quantize
    return model.eval().requires_grad_(False)


def load_connector_from_reader(reader: CheckpointReader, prefix: str, what: str, *, dtype: torch.dtype = torch.float32,
                               device="cpu") -> Connector:
    """The connector whose tensors are ``prefix*`` in ``reader``, streamed into place like the
    other parts (its shapes come from the file, no randomly initialised copy is made)."""
    keys = [k for k in reader.keys() if k.startswith(prefix)]
    if not keys:
        raise CheckpointError(f"{what} holds no connector weights (no '{prefix}*' tensors)")

    def name(key: str) -> str:
        k = key[len(prefix):]
        return "denoise_projector." + k if k[:1].isdigit() else k

    by_name = {name(k): k for k in keys}
    try:
        hidden, inp = reader.shape(by_name["denoise_projector.0.weight"])
        out, hidden2 = reader.shape(by_name["denoise_projector.2.weight"])
    except KeyError:
        raise CheckpointError(
            f"{what}: connector weights must contain 'denoise_projector.0.weight' and 'denoise_projector.2.weight' "
            f"(found {', '.join(sorted(by_name)[:6])})"
        ) from None
    if hidden2 != hidden:
        raise CheckpointError(f"{what}: connector layers do not chain: first is {inp}->{hidden}, second is {hidden2}->{out}")
    num_queries = reader.shape(by_name["queries"])[0] if "queries" in by_name else 0
    with empty_weights():
        conn = Connector(inp, out, hidden, type_embedding="type_embedding" in by_name, num_queries=num_queries)
    stream_weights(conn, reader, {k: name(k) for k in keys}, dtype=dtype, device=device, what=f"connector in {what}")
    return conn.eval().requires_grad_(False)


def load_flux_transformer_from_reader(reader: CheckpointReader, prefix: str, config: dict, dtype, device, what: str,
                                      *, quantize: str = "none"):
    """A diffusers FluxTransformer2DModel from ``config`` filled with the ``prefix`` tensors
    (``quantize="fp8"``: streamed straight into float8 storage)."""
    from diffusers import FluxTransformer2DModel  # start-up: diffusers' models (~4 s)

    q = storage(quantize)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with empty_weights():
        transformer = FluxTransformer2DModel.from_config(cfg)
    convert = prepare_streamed_storage(transformer, q, dtype, "transformer")
    names = {k: k[len(prefix):] for k in reader.keys() if k.startswith(prefix)}
    stream_weights(transformer, reader, names, dtype=dtype, device=device, what=what, convert=convert)
    return transformer.eval().requires_grad_(False)


def prepare_streamed_storage(model: torch.nn.Module, q, dtype: torch.dtype, part: str, scales=None) -> dict:
    """Ready a model still on the meta device for a storage row's streaming load: float8 storage
    (layerwise) is assigned straight into fp8; fp8 compute (scaled_mm) gets its ``Fp8Linear``
    layers and the converters that quantise each weight as it is read (``scales``: stored
    per-tensor scales). Returns the converters for :func:`stream_weights` (empty otherwise)."""
    if q.method == "layerwise":
        prepare_fp8_storage(model, dtype, part, q.store)
    elif q.method == "scaled_mm":
        prepare_fp8_compute(model, dtype, part, scales)
        return fp8_compute_converters(model, scales)
    return {}


@dataclass
class GIECheckpoint:
    """The three parts of a released checkpoint (a part is None when not asked for)."""

    encoder: object | None  # encoders.QwenVLEncoder
    connector: Connector | None
    transformer: torch.nn.Module | None
    config: dict


def load_gie_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    parts: tuple[str, ...] = ("encoder", "connector", "transformer"),
    processor_dir: str | os.PathLike | None = None,
    transformer_quantize: str = "none",
    qwen_quantize: str = "none",
    lm_head: bool = False,
) -> GIECheckpoint:
    """Load the released GPT-Image-Edit checkpoint directory, streamed from its shards.

    ``parts`` picks what to load; ``processor_dir`` supplies the Qwen tokenizer and image
    processor when the checkpoint directory lacks them. ``transformer_quantize`` /
    ``qwen_quantize``: rows of :data:`gie_core.weights.quantize.STORAGE_TABLE` ("fp8"; "int8"/"nf4"
    for Qwen via bitsandbytes), checked by :func:`gie_core.weights.parts.check_load` (this is
    the low layer it dispatches to). ``lm_head``: read Qwen's output head now (by default it is
    read the first time text is generated, i.e. only for instruction rewriting).
    """
    p = Path(path)
    cfg = gie_config(p)
    dtype = parse_dtype(dtype)
    unknown = set(parts) - {"encoder", "connector", "transformer"}
    if unknown:
        raise ValueError(f"parts {sorted(unknown)} are unknown; expected encoder, connector, transformer")
    tower = cfg["denoise_tower"]
    encoder = connector = transformer = None
    with CheckpointReader.open(p) as reader:
        if "connector" in parts:
            connector = load_connector_from_reader(reader, GIE_PROJECTOR_PREFIX, str(p), dtype=dtype, device=device)
        if "transformer" in parts:
            transformer = load_flux_transformer_from_reader(
                reader, GIE_DENOISER_PREFIX, tower["denoiser_config"], dtype, device, f"Kontext transformer in {p}",
                quantize=transformer_quantize,
            )
        if "encoder" in parts:
            model = load_qwen_from_gie(p, cfg, reader, dtype, device, quantize=qwen_quantize, lm_head=lm_head)
            encoder = QwenVLEncoder(model, *load_qwen_processing(processor_dir or p))
    return GIECheckpoint(encoder, connector, transformer, cfg)


def load_qwen_processing(path: str | os.PathLike):
    """(tokenizer, image_processor, stock processor or None) from a directory of processor files."""
    from transformers import AutoTokenizer  # start-up: transformers (~1 s)

    p = Path(path)
    if not (p / "tokenizer.json").exists() and not (p / "vocab.json").exists():
        raise CheckpointError(
            f"{p} has no Qwen tokenizer files (tokenizer.json); pass the Qwen2.5-VL processor directory"
        )
    if not (p / "preprocessor_config.json").exists():
        raise CheckpointError(f"{p} has no preprocessor_config.json for the Qwen2.5-VL image processor")
    with quiet_transformers():  # it peeks at config.json, whose model_type transformers doesn't know
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    image_processor = load_qwen_image_processor(p)
    processor = None
    if torchvision_available():
        try:
            from transformers import AutoProcessor  # start-up: transformers (~1 s)

            processor = AutoProcessor.from_pretrained(p, local_files_only=True)
        except Exception:  # processor files incomplete: the image-only path works the same
            processor = None
    return tokenizer, image_processor, processor


# --------------------------------------------------------------------------------------
# FLUX.1-Kontext-dev diffusers directory
# --------------------------------------------------------------------------------------


def _dtype_kwarg(cls, dtype) -> dict:
    """diffusers >= 0.42 takes ``dtype=``; older versions ``torch_dtype=``."""
    params = inspect.signature(cls.from_pretrained).parameters
    return {"dtype": dtype} if "dtype" in params else {"torch_dtype": dtype}


@dataclass
class KontextComponents:
    """Parts of a FLUX.1-Kontext directory; a part is None when not asked for."""

    transformer: torch.nn.Module | None
    vae: torch.nn.Module | None
    scheduler: object | None
    text: object | None  # encoders.TextEncoders


KONTEXT_PARTS = ("transformer", "vae", "scheduler", "clip", "t5")


def kontext_index(path: str | os.PathLike) -> dict:
    """model_index.json of a FLUX diffusers directory, checked to be one."""
    p = _check_dir(path, "FLUX.1-Kontext directory")
    index = p / "model_index.json"
    if not index.exists():
        if (p / "config.json").exists() and "denoise_tower" in (p / "config.json").read_text():
            raise CheckpointError(f"{p} is a GPT-Image-Edit checkpoint, not a FLUX.1-Kontext diffusers directory")
        raise CheckpointError(f"{p} is not a FLUX.1-Kontext diffusers directory: it has no model_index.json")
    data = _read_json(index, "a diffusers directory")
    if not str(data.get("_class_name", "")).startswith("Flux"):
        raise CheckpointError(f"{p} is a {data.get('_class_name')} directory, not a FLUX.1-Kontext one")
    return data


def load_kontext_dir(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    parts: tuple[str, ...] = KONTEXT_PARTS,
    t5_max_length: int | None = None,
    transformer_quantize: str = "none",
) -> KontextComponents:
    """Load components of a FLUX.1-Kontext-dev diffusers directory (local files only).

    ``transformer_quantize="fp8"`` stores the transformer's layers in float8 (see
    :mod:`gie_core.weights.quantize`). Weights are read from safetensors only: a folder holding
    ``.bin`` files alone is refused, naming it."""
    # Each model class is imported only when its part is loaded: diffusers' autoencoders package
    # and transformers' text models cost about a second of start-up each.
    p = Path(path)
    kontext_index(p)
    dtype = parse_dtype(dtype)
    unknown = set(parts) - set(KONTEXT_PARTS)
    if unknown:
        raise ValueError(f"parts {sorted(unknown)} are unknown; expected some of {', '.join(KONTEXT_PARTS)}")

    def sub(name):
        d = p / name
        if not d.is_dir():
            raise CheckpointError(f"{p} has no {name}/ folder (is it a complete FLUX.1-Kontext directory?)")
        return d

    def model(cls, name):
        kw = _dtype_kwarg(cls, dtype)
        require_safetensors(sub(name))
        try:
            m = cls.from_pretrained(sub(name), local_files_only=True, use_safetensors=True, **kw)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise CheckpointError(f"could not load {name} from {p}: {exc}") from None
        return m.to(device).eval().requires_grad_(False)

    transformer = vae = scheduler = None
    if "transformer" in parts:
        from diffusers import FluxTransformer2DModel  # start-up: diffusers' models (~3 s)

        transformer = load_diffusers_model(FluxTransformer2DModel, sub("transformer"), dtype, device,
                                           quantize=transformer_quantize, part="transformer")
    if "vae" in parts:
        from diffusers import AutoencoderKL  # start-up: diffusers' autoencoders (~1 s)

        vae = load_diffusers_model(AutoencoderKL, sub("vae"), dtype, device)
    if "scheduler" in parts:
        from diffusers import FlowMatchEulerDiscreteScheduler  # start-up: diffusers' schedulers

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sub("scheduler"))
    text = None
    if "clip" in parts or "t5" in parts:
        # start-up: transformers' text models (~1 s), imported only when a text encoder is loaded
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        clip = model(CLIPTextModel, "text_encoder") if "clip" in parts else None
        clip_tok = AutoTokenizer.from_pretrained(sub("tokenizer"), local_files_only=True) if "clip" in parts else None
        t5 = model(T5EncoderModel, "text_encoder_2") if "t5" in parts else None
        t5_tok = AutoTokenizer.from_pretrained(sub("tokenizer_2"), local_files_only=True) if "t5" in parts else None
        text = TextEncoders(clip, clip_tok, t5, t5_tok, t5_max_length or T5_MAX_LENGTH)
    return KontextComponents(transformer, vae, scheduler, text)


def load_diffusers_model(cls, folder: Path, dtype: torch.dtype, device, *, quantize: str = "none",
                         part: str = "transformer"):
    """A diffusers model folder (``config.json`` + safetensors, sharded or not) streamed through
    :class:`CheckpointReader` into ``dtype`` on ``device``: the tensors are the same as
    ``cls.from_pretrained(folder, torch_dtype=dtype)``'s, read front to back with read-ahead,
    cast in chunks straight into the kept tensors (``quantize="fp8"``: straight into float8
    storage, the bf16 file never held). A folder whose names are not the model's current ones
    (an older diffusers layout) goes through ``from_pretrained``, which knows the renames."""
    require_safetensors(folder)
    q = storage(quantize)
    try:
        config = cls.load_config(folder, local_files_only=True)
        with empty_weights():
            model = cls.from_config(config)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"could not read the model config in {folder}: {exc}") from None
    with CheckpointReader.open(folder) as reader:
        names = {k: k for k in reader.keys()}
        if set(names) != set(model.state_dict()):
            del model
            try:
                model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, **_dtype_kwarg(cls, dtype))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"could not load {folder}: {exc}") from None
            model = model.to(device)
            if q.method == "layerwise":
                prepare_fp8_storage(model, dtype, part, q.store)
            elif q.method == "scaled_mm":
                prepare_fp8_compute(model, dtype, part)
            return model.eval().requires_grad_(False)
        convert = prepare_streamed_storage(model, q, dtype, part)
        stream_weights(model, reader, names, dtype=dtype, device=device, what=f"{cls.__name__} weights in {folder}",
                       convert=convert)
    model.register_to_config(_name_or_path=folder)  # as from_pretrained records it
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------
# Files written by our trainer
# --------------------------------------------------------------------------------------


def load_connector(path: str | os.PathLike, *, dtype="bf16", device="cpu") -> Connector:
    """The one connector loader (the CLI, the trainer, the nodes and the library alike): a
    connector file (``gie-convert``'s, ``gie-train``'s export, or any file holding the
    ``denoise_projector.*`` keys, also under the released ``denoise_tower.`` prefix) or a
    GPT-Image-Edit checkpoint directory, streamed into place. Its widths come from the shapes;
    the fusion mode a file's metadata names (``gie_fusion_mode``), if any, is kept as
    ``.default_mode``."""
    p = Path(path)
    dtype = parse_dtype(dtype)
    if p.is_dir():
        gie_config(p)
    with CheckpointReader.open(p) as reader:
        prefix = GIE_PROJECTOR_PREFIX if any(k.startswith(GIE_PROJECTOR_PREFIX) for k in reader.keys()) else ""
        conn = load_connector_from_reader(reader, prefix, str(p), dtype=dtype, device=device)
        conn.default_mode = reader.metadata.get("gie_fusion_mode") or None
    return conn


# --------------------------------------------------------------------------------------------
# A stock Qwen2.5-VL transformers directory
# --------------------------------------------------------------------------------------------


def require_safetensors(folder: Path) -> None:
    """Refuse a model folder whose weights are ``.bin`` only (we read safetensors, never pickles)."""
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.ckpt")):
        raise CheckpointError(
            f"{folder} holds its weights as .bin/.pt pickles only; only safetensors are read "
            "(convert the folder to safetensors, e.g. with transformers' save_pretrained(safe_serialization=True))"
        )


def load_qwen_dir(path: str | os.PathLike, *, dtype: str | torch.dtype = "bf16", device="cpu", quantize: str = "none"):
    """A stock Qwen2.5-VL transformers directory (e.g. Qwen2.5-VL-7B-Instruct) as the engine's
    :class:`gie_core.engine.encoders.QwenVLEncoder` (safetensors only; ``quantize="fp8"``:
    float8 storage with per-layer upcast)."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # start-up: transformers' models (~4 s)

    p = _check_dir(path, "Qwen2.5-VL directory")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} is not a transformers model directory (no config.json)")
    require_safetensors(p)
    dtype = parse_dtype(dtype)
    try:
        with quiet_transformers():
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                p, local_files_only=True, use_safetensors=True, attn_implementation="sdpa",
                **_dtype_kwarg(Qwen2_5_VLForConditionalGeneration, dtype),
            )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not load the Qwen2.5-VL in {p}: {exc}") from None
    model = model.to(device).eval().requires_grad_(False)
    q = storage(quantize)
    if q.method == "layerwise":
        prepare_fp8_storage(model, dtype, "qwen", q.store)
    return QwenVLEncoder(model, *load_qwen_processing(p))
