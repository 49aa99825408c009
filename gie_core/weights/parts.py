"""One way in for weights: a part's source plus a storage choice -> the loaded part.

The pipeline, the CLI, the nodes, the trainer and the converter only name what they want::

    from gie_core.weights.parts import load_part

    loaded = load_part("transformer", "flux1-kontext-dev.safetensors", storage="fp8", dtype="bf16")
    loaded.module        # the FluxTransformer2DModel, its blocks stored in float8
    loaded.decided       # "transformer from ... (a safetensors file, bfl_transformer): fp8 ..."

and decide nothing about formats. This module alone does:

- :func:`resolve_source` says what a path is (:data:`SOURCE_KINDS`: a released GPT-Image-Edit
  folder, a FLUX.1-Kontext diffusers folder, a stock Qwen2.5-VL folder, a safetensors single file
  of a detected layout, a GGUF file) and which parts it holds; only headers are read;
- :func:`check_load` checks every choice before a weight is read: the part is known and the
  source holds it, the storage (a row of :data:`STORAGE_TABLE`) takes the part and the source,
  its package is installed and its device fits, the part's options are complete;
- :func:`load_part` dispatches to the format readers below it (:mod:`.loading`,
  :mod:`.single_file`, :mod:`.gguf`, :mod:`.quantize`, :mod:`.lora`, :mod:`.reader`).

A new storage kind is one row of :data:`STORAGE_TABLE` (and its mechanics in :mod:`.quantize`);
a new part is one row of :data:`PART_TABLE` and its loader in ``_LOADERS`` (the task head is
the latest).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gie_core.checks import import_problem
from gie_core.constants import AUTO_DTYPE, DTYPE_TABLE, LOAD_DEFAULTS, T5_MAX_LENGTH, TASK_HEAD_PT, TASK_HEAD_SAFETENSORS
from gie_core.engine.encoders import TextEncoders
from gie_core.engine.taskhead import TaskHead
from gie_core.weights import gguf as gguf_files
from gie_core.weights import loading, single_file
from gie_core.weights.lora import load_lora
from gie_core.weights.quantize import (
    NO_QUANTIZATION,
    STORAGE_TABLE,
    Storage,
    package_available,
    prepare_fp8_storage,
    quantize_choices,
)
from gie_core.weights.quantize import storage as storage_row
from gie_core.weights.reader import CheckpointError, CheckpointReader

__all__ = [
    "PART_TABLE",
    "SOURCE_KINDS",
    "STORAGE_TABLE",
    "LoadPlan",
    "LoadedPart",
    "Source",
    "check_load",
    "check_quantization",
    "dtype_name",
    "load",
    "load_part",
    "load_text_encoders",
    "quantize_choices",
    "require_source",
    "resolve_dtype",
    "resolve_source",
    "scheduler_from",
    "task_head_path",
]

SOURCE_KINDS: dict[str, str] = {
    "gie_dir": "a GPT-Image-Edit checkpoint folder",
    "kontext_dir": "a FLUX.1-Kontext diffusers folder",
    "qwen_dir": "a Qwen2.5-VL transformers folder",
    "file": "a safetensors file",
    "gguf": "a GGUF file",
}
# The parts a folder or GGUF file holds (a safetensors file holds what its tensors say).
_SOURCE_HOLDS: dict[str, tuple[str, ...]] = {
    "gie_dir": ("transformer", "qwen", "connector"),
    "kontext_dir": ("transformer", "vae", "clip", "t5"),
    "qwen_dir": ("qwen",),
    "gguf": ("transformer",),
}
# The checks of folders that have one (they name what a folder is instead).
_FOLDER_CHECKS = {"gie_dir": loading.gie_config, "kontext_dir": loading.kontext_index}
# single_file's detected layouts -> the part they are.
_LAYOUT_PART = {"bfl_transformer": "transformer", "diffusers_transformer": "transformer", "vae": "vae", "t5": "t5",
                "clip": "clip", "qwen2.5-vl": "qwen", "connector": "connector"}


@dataclass(frozen=True)
class Part:
    """One row: a part load_part can load, and the options its loader takes."""

    name: str
    description: str
    options: tuple[str, ...] = ()  # keyword options of load_part for this part
    required: dict = field(default_factory=dict)  # option -> the source kinds that need it


PART_TABLE: dict[str, Part] = {
    p.name: p
    for p in (
        Part("transformer", "a FLUX.1 Kontext transformer"),
        Part("qwen", "a Qwen2.5-VL encoder (with its tokenizer and image processor)",
             ("tokenizer_dir", "preprocessor_dir", "config_dir", "lm_head"), {"tokenizer_dir": ("file",)}),
        Part("t5", "a T5 text encoder (with its tokenizer)", ("tokenizer_dir", "max_length"), {"tokenizer_dir": ("file",)}),
        Part("clip", "a CLIP text encoder (with its tokenizer)", ("tokenizer_dir",), {"tokenizer_dir": ("file",)}),
        Part("vae", "a FLUX VAE"),
        Part("connector", "a GPT-Image-Edit connector"),
        Part("lora", "a FLUX LoRA (added to a loaded transformer as a disabled adapter)", ("transformer",),
             {"transformer": ("file",)}),
        Part("task_head", "the generate-or-answer task head (task_head_final.pt or task_head.safetensors; "
                          "always float32, as the app runs it)"),
    )
}


@dataclass(frozen=True)
class Source:
    """What a path is: its kind (:data:`SOURCE_KINDS`), the parts it holds and, for a single
    file, the layout detected from its tensor names."""

    path: Path
    kind: str
    holds: tuple[str, ...]
    layout: str = ""

    def describe(self) -> str:
        extra = f", {self.layout}" if self.kind == "file" and self.layout else ""
        return f"{self.path} ({SOURCE_KINDS[self.kind]}{extra})"


@dataclass(frozen=True)
class LoadPlan:
    """A checked load: nothing is read yet, every choice is known to fit."""

    part: str
    source: Source
    storage: Storage  # the row used ("auto" resolved: a GGUF file's own, else the compute dtype)
    dtype: torch.dtype  # the compute dtype
    device: torch.device  # where the weights are loaded
    options: dict

    @property
    def decided(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        how = "as stored" if self.storage.method == "gguf" else self.storage.name
        return f"{self.part} from {self.source.describe()}: {how} ({self.storage.description}), computing in {dtype}"


@dataclass
class LoadedPart:
    """A loaded part: the module (a ``QwenVLEncoder`` for qwen, which carries its tokenizer and
    image processor), its tokenizer / processor, and what was decided."""

    part: str
    module: Any
    source: Source
    storage: str
    decided: str
    tokenizer: Any = None
    processor: Any = None
    adapter: str = ""  # lora: the adapter name in its transformer


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def resolve_source(path: str | os.PathLike | Source, part: str | None = None) -> Source:
    """What ``path`` is and which parts it holds (folders by their config files, single files by
    their header's tensor names, GGUF files by suffix, magic number and completeness). ``part``
    "lora" takes a LoRA file as it is (:mod:`.lora` reads its several layouts)."""
    if isinstance(path, Source):
        return path
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if p.is_dir():
        return _folder_source(p)
    if gguf_files.is_gguf(p):
        gguf_files.open_checked(p)  # the header, and that the file is complete
        return Source(p, "gguf", _SOURCE_HOLDS["gguf"], "gguf")
    if part == "lora":
        return Source(p, "file", ("lora",), "lora")
    if part == "task_head" or p.suffix == ".pt":  # the head's file is checked by its loader's reader
        if p.suffix not in (".pt", ".safetensors"):
            raise CheckpointError(f"{p} is not a task head file: expected {TASK_HEAD_PT} (read with "
                                  f"torch.load(weights_only=True)) or a .safetensors file")
        return Source(p, "file", ("task_head",), "task_head")
    kinds = single_file.file_kinds(p)
    layouts = [k for k in single_file.KINDS if k in kinds]
    holds = tuple(dict.fromkeys(_LAYOUT_PART[k] for k in layouts))
    return Source(p, "file", holds, layouts[0] if layouts else "")


def require_source(path: str | os.PathLike | Source, kind: str) -> Source:
    """``path`` as a source of ``kind``, for a caller that gives a path a role (``--model`` is a
    GPT-Image-Edit checkpoint, ``--kontext`` a FLUX.1-Kontext folder): a CheckpointError saying
    what it is otherwise."""
    if not isinstance(path, Source) and kind in _FOLDER_CHECKS:
        _FOLDER_CHECKS[kind](Path(path).expanduser())  # the folder's own check names what it is instead
    src = resolve_source(path)
    if src.kind != kind:
        raise CheckpointError(f"{src.describe()} is not {SOURCE_KINDS[kind]}")
    return src


def _folder_source(p: Path) -> Source:
    if (p / "model_index.json").is_file():
        loading.kontext_index(p)  # a FLUX pipeline folder, or a clear error saying what it is
        return Source(p, "kontext_dir", _SOURCE_HOLDS["kontext_dir"])
    config = p / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config} is not valid JSON: {exc}") from None
        if "denoise_tower" in cfg:
            loading.gie_config(p)
            loading.require_safetensors(p)
            head = ("task_head",) if task_head_path(p) is not None else ()
            return Source(p, "gie_dir", _SOURCE_HOLDS["gie_dir"] + head)
        if "qwen2_5_vl" in str(cfg.get("model_type", "")):
            loading.require_safetensors(p)
            return Source(p, "qwen_dir", _SOURCE_HOLDS["qwen_dir"])
        raise CheckpointError(f"{p} is a '{cfg.get('model_type', '?')}' model folder, not a GPT-Image-Edit checkpoint, "
                              "a FLUX.1-Kontext diffusers folder or a Qwen2.5-VL folder")
    raise CheckpointError(f"{p} is not a model folder: it has no model_index.json (a FLUX.1-Kontext diffusers folder) "
                          "or config.json (a GPT-Image-Edit checkpoint, a Qwen2.5-VL folder)")


# --------------------------------------------------------------------------------------------
# Checks, before any weight is read
# --------------------------------------------------------------------------------------------


def dtype_name(dtype: str, device: str | torch.device | None = None) -> str:
    """A dtype name of :data:`gie_core.constants.DTYPE_TABLE`; "auto" becomes bf16 on a GPU and
    fp32 on the CPU (where bf16 matmuls are slow)."""
    if dtype == AUTO_DTYPE:
        return "fp32" if torch.device(device or "cpu").type == "cpu" else "bf16"
    if dtype not in DTYPE_TABLE:
        raise ValueError(f"dtype '{dtype}' is unknown; expected {AUTO_DTYPE} or one of {', '.join(DTYPE_TABLE)}")
    return dtype


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """The compute dtype: a name of :data:`gie_core.constants.DTYPE_TABLE` (or "auto", see
    :func:`dtype_name`) or a torch dtype; None is the library's default."""
    if dtype is None:
        dtype = LOAD_DEFAULTS["library"].dtype
    if isinstance(dtype, str) and dtype.lower() in (AUTO_DTYPE, *DTYPE_TABLE):
        dtype = dtype_name(dtype.lower(), device)
    return loading.parse_dtype(dtype)


def _storage_choices(part: str, kind: str) -> str:
    names = [s.name for s in STORAGE_TABLE.values() if part in s.parts and kind in s.sources]
    return ", ".join(names) or "none"


def _check_storage(part: str, row: Storage, name: str, src: Source, run_device) -> None:
    """The row takes the part and the source; its package, dtypes and device are there."""
    word = "quantization" if row.quantizes or row.method == "gguf" else "storage"
    if part not in row.parts:
        allowed = ", ".join(quantize_choices(part) if word == "quantization" else
                            [s.name for s in STORAGE_TABLE.values() if part in s.parts])
        hint = " (GGUF transformers are chosen by the file: pass a .gguf file)" if part == "transformer" else ""
        raise ValueError(f"{part} {word} '{name}' is not available for the {part}; expected one of {allowed}{hint}")
    if src.kind not in row.sources:
        if src.kind == "gguf":
            raise ValueError(f"the {part} {src.path} is a GGUF file, quantised already; drop the {part} {word} '{name}'")
        if row.method == "bnb":
            raise ValueError(f"{part} quantization '{name}' (bitsandbytes) needs the checkpoint folder; "
                             f"{src.describe()} takes {_storage_choices(part, src.kind)}")
        raise ValueError(f"{part} {word} '{name}' does not apply to {src.describe()}; it takes "
                         f"{_storage_choices(part, src.kind)}")
    if row.package and not package_available(row.package):
        if row.method == "bnb":
            raise ValueError(f"{part} quantization '{name}' needs bitsandbytes, which is not installed: "
                             "pip install \"gpt-image-edit-nodes[bnb]\" (CUDA GPUs), or use 'fp8'")
        raise ValueError(f"{part} {word} '{name}' needs the '{row.package}' package: pip install {row.package}")
    if row.package and (problem := import_problem(row.package, f"pip install {row.package}")):
        raise ValueError(f"{part} {word} '{name}' cannot run here: {problem}; or use 'fp8'")
    if row.method in ("layerwise", "scaled_mm") and not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(f"{part} quantization '{name}' needs a torch with float8 dtypes (torch {torch.__version__} has none)")
    if row.devices and run_device is not None and torch.device(run_device).type not in row.devices:
        raise ValueError(f"{part} quantization '{name}' ({row.package or row.method}) runs on "
                         f"{' or '.join(row.devices)} devices, not on '{torch.device(run_device)}'; use 'fp8'")


def _check_options(part: Part, src: Source, options: dict) -> dict:
    unknown = sorted(set(options) - set(part.options))
    if unknown:
        raise TypeError(f"load_part('{part.name}') takes no option {', '.join(unknown)}; "
                        f"its options are {', '.join(part.options) or 'none'}")
    for option, kinds in part.required.items():
        if src.kind in kinds and options.get(option) is None:
            raise ValueError(f"{part.description} from {src.describe()} needs {option}")
    for option in ("tokenizer_dir", "preprocessor_dir", "config_dir"):
        value = options.get(option)
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"{option} {value} is not a folder (the {part.name} tokenizer/config files)")
    return {k: v for k, v in options.items() if v is not None}


def check_load(part: str, source: str | os.PathLike | Source, storage: str | None = "auto", *,
               dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               run_device: str | torch.device | None = None, **options) -> LoadPlan:
    """Check one load before any weight is read; returns the :class:`LoadPlan` that
    :func:`load_part` carries out. Raises ``ValueError`` (a :class:`CheckpointError` for a path)
    naming the input and what was expected. ``device``: where the weights are loaded (the CPU by
    default; the parts visit the run device when used); ``run_device``: where the part will
    run, for storages that load straight there (bitsandbytes) and device checks."""
    if part not in PART_TABLE:
        raise ValueError(f"part '{part}' is unknown; expected one of {', '.join(PART_TABLE)}")
    src = resolve_source(source, part)
    if part not in src.holds:
        held = ", ".join(src.holds) or f"no part we load ({single_file.describe_file(src.path)})"
        raise CheckpointError(f"{src.describe()} holds no {part}: expected {PART_TABLE[part].description}; it holds {held}")
    name = NO_QUANTIZATION if storage in (None, "") else storage
    row = storage_row(name)
    if row.method == "auto" and src.kind == "gguf":
        row = STORAGE_TABLE["gguf"]
    _check_storage(part, row, name, src, run_device)
    opts = _check_options(PART_TABLE[part], src, options)
    if row.method == "compute":
        if dtype is not None and dtype != AUTO_DTYPE and loading.parse_dtype(dtype) != row.store:
            raise ValueError(f"{part} storage '{row.name}' computes in {row.name}; dtype '{dtype}' contradicts it")
        compute = row.store
    else:
        compute = resolve_dtype(dtype, run_device or device)
    load_device = torch.device(run_device if row.run_device and run_device is not None else device)
    return LoadPlan(part, src, row, compute, load_device, opts)


def check_quantization(part: str, name: str | None, device: str | torch.device | None = None) -> str:
    """A face's "quantize" choice for ``part`` checked alone (no source yet): the row exists and
    takes the part, its package is installed and ``device`` can run it. None means "none"."""
    name = NO_QUANTIZATION if name in (None, "") else name
    if part not in PART_TABLE:
        raise ValueError(f"model part '{part}' is unknown; expected one of {', '.join(PART_TABLE)}")
    row = storage_row(name)
    any_source = Source(Path("."), row.sources[0], (part,))
    _check_storage(part, row, name, any_source, device)
    return name


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_part(part: str, source: str | os.PathLike | Source, storage: str | None = "auto", *,
              dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
              run_device: str | torch.device | None = None, **options) -> LoadedPart:
    """Load ``part`` ("transformer", "qwen", "t5", "clip", "vae", "connector", "lora") from
    ``source`` (a path or a :class:`Source`) stored as ``storage`` (a row of
    :data:`STORAGE_TABLE`; "auto"/"none": the compute dtype, a GGUF file as stored), computing
    in ``dtype``. Everything is checked first (:func:`check_load`). Part options: qwen
    ``tokenizer_dir`` (needed for a single file), ``preprocessor_dir``, ``config_dir``,
    ``lm_head`` (None: if the file has it); t5 ``tokenizer_dir``, ``max_length``; clip
    ``tokenizer_dir``; lora ``transformer`` (the loaded transformer it joins)."""
    plan = check_load(part, source, storage, dtype=dtype, device=device, run_device=run_device, **options)
    return _LOADERS[part](plan)


def _done(plan: LoadPlan, module, **extra) -> LoadedPart:
    return LoadedPart(plan.part, module, plan.source, plan.storage.name, plan.decided, **extra)


def _layerwise(plan: LoadPlan, module: torch.nn.Module) -> torch.nn.Module:
    """Apply a layerwise row (fp8 storage) to a module loaded in the compute dtype. Loaders that
    stream straight into the stored dtype do it themselves, as every loader of fp8 compute (a
    transformer-only row) does."""
    if plan.storage.method == "layerwise":
        prepare_fp8_storage(module, plan.dtype, plan.part, plan.storage.store)
    return module


def _load_transformer(plan: LoadPlan) -> LoadedPart:
    src, name = plan.source, plan.storage.name
    if src.kind == "gguf":
        model = gguf_files.load_gguf_transformer(src.path, dtype=plan.dtype, device=plan.device)
    elif src.kind == "gie_dir":
        model = loading.load_gie_checkpoint(src.path, dtype=plan.dtype, device=plan.device, parts=("transformer",),
                                            transformer_quantize=name).transformer
    elif src.kind == "kontext_dir":
        model = loading.load_kontext_dir(src.path, dtype=plan.dtype, device=plan.device, parts=("transformer",),
                                         transformer_quantize=name).transformer
    else:  # fp8 compute keeps a scaled-fp8 file's stored scales (the loader reads them)
        model = single_file.load_bfl_transformer(src.path, dtype=plan.dtype, device=plan.device, quantize=name)
    return _done(plan, model.requires_grad_(False))


def _load_qwen(plan: LoadPlan) -> LoadedPart:
    src, opts = plan.source, plan.options
    if src.kind == "gie_dir":
        encoder = loading.load_gie_checkpoint(
            src.path, dtype=plan.dtype, device=plan.device, parts=("encoder",), qwen_quantize=plan.storage.name,
            processor_dir=opts.get("tokenizer_dir"), lm_head=bool(opts.get("lm_head")),
        ).encoder
    elif src.kind == "qwen_dir":
        encoder = loading.load_qwen_dir(src.path, dtype=plan.dtype, device=plan.device, quantize=plan.storage.name)
    else:
        encoder = single_file.load_qwen_file(
            src.path, tokenizer_dir=opts["tokenizer_dir"], preprocessor_dir=opts.get("preprocessor_dir"),
            config_dir=opts.get("config_dir"), dtype=plan.dtype, device=plan.device, lm_head=opts.get("lm_head"),
        )
        _layerwise(plan, encoder.model)
    return _done(plan, encoder, tokenizer=encoder.tokenizer, processor=encoder.image_processor)


def _tokenizer(path, what: str):
    """A tokenizer folder for a single-file text encoder, or a CheckpointError naming it."""
    from transformers import AutoTokenizer  # start-up: transformers (~1 s)

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{what} tokenizer directory {p} does not exist")
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p} holds no usable {what} tokenizer: {exc}") from None


def _load_text(plan: LoadPlan) -> LoadedPart:
    src, opts, part = plan.source, plan.options, plan.part
    if src.kind == "kontext_dir":
        text = loading.load_kontext_dir(src.path, dtype=plan.dtype, device=plan.device, parts=(part,),
                                        t5_max_length=opts.get("max_length")).text
        module, tokenizer = (text.t5, text.t5_tokenizer) if part == "t5" else (text.clip, text.clip_tokenizer)
    elif part == "t5":
        tokenizer = _tokenizer(opts["tokenizer_dir"], "T5")
        module = single_file.load_t5_encoder(src.path, dtype=plan.dtype, device=plan.device)
    else:
        tokenizer = _tokenizer(opts["tokenizer_dir"], "CLIP")
        module = single_file.load_clip_text(src.path, dtype=plan.dtype, device=plan.device,
                                            eos_token_id=tokenizer.eos_token_id)
    return _done(plan, module.requires_grad_(False), tokenizer=tokenizer)


def _load_vae(plan: LoadPlan) -> LoadedPart:
    src = plan.source
    if src.kind == "kontext_dir":
        vae = loading.load_kontext_dir(src.path, dtype=plan.dtype, device=plan.device, parts=("vae",)).vae
    else:
        vae = single_file.load_bfl_vae(src.path, dtype=plan.dtype, device=plan.device)
    return _done(plan, vae.requires_grad_(False))


def _load_connector(plan: LoadPlan) -> LoadedPart:
    return _done(plan, loading.load_connector(plan.source.path, dtype=plan.dtype, device=plan.device))


def task_head_path(folder: str | os.PathLike) -> Path | None:
    """The task head file in a checkpoint folder: ``task_head.safetensors`` (gie-convert's), else
    the shipped ``task_head_final.pt``; None when the folder has neither."""
    for name in (TASK_HEAD_SAFETENSORS, TASK_HEAD_PT):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def read_task_head_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The task head's tensors from a ``.safetensors`` file, or from the shipped ``.pt`` with
    ``torch.load(weights_only=True)`` (tensors and plain containers only: a pickle that
    would run code is refused, never executed)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        with CheckpointReader.open(p) as r:
            return {k: r.read(k) for k in r.keys()}
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code, RuntimeError/EOFError for damaged zips
        raise CheckpointError(f"task head {p} cannot be read with torch.load(weights_only=True): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"task head {p} is not a state dict of tensors")
    return state


def _load_task_head(plan: LoadPlan) -> LoadedPart:
    path = task_head_path(plan.source.path) if plan.source.kind == "gie_dir" else plan.source.path
    try:
        head = TaskHead.from_state_dict(read_task_head_state(path), f"task head {path}")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return _done(plan, head.float().to(plan.device))


def _load_lora(plan: LoadPlan) -> LoadedPart:
    transformer = plan.options["transformer"]
    return _done(plan, transformer, adapter=load_lora(transformer, plan.source.path))


_LOADERS: dict[str, Callable[[LoadPlan], LoadedPart]] = {
    "transformer": _load_transformer,
    "qwen": _load_qwen,
    "t5": _load_text,
    "clip": _load_text,
    "vae": _load_vae,
    "connector": _load_connector,
    "lora": _load_lora,
    "task_head": _load_task_head,
}


# --------------------------------------------------------------------------------------------
# What several parts make together
# --------------------------------------------------------------------------------------------


def load_text_encoders(clip: LoadPlan | LoadedPart | None, t5: LoadPlan | LoadedPart | None,
                       max_length: int | None = None) -> TextEncoders:
    """The engine's :class:`TextEncoders` from a CLIP and (optionally) a T5 part, checked plans
    or loaded parts (without T5: enough for the ``vlm`` mode, whose pooled vector is CLIP's)."""
    def loaded(x):
        return _LOADERS[x.part](x) if isinstance(x, LoadPlan) else x

    c, t = loaded(clip), loaded(t5)
    return TextEncoders(c.module if c else None, c.tokenizer if c else None, t.module if t else None,
                        t.tokenizer if t else None, max_length or T5_MAX_LENGTH)


def scheduler_from(source: str | os.PathLike | Source | None = None):
    """The FlowMatch Euler scheduler of a FLUX.1-Kontext folder, or FLUX's shipped one (the
    checkpoints and single files carry none)."""
    if source is None:
        return single_file.default_scheduler()
    src = resolve_source(source)
    if src.kind != "kontext_dir":
        raise CheckpointError(f"{src.describe()} has no scheduler; a FLUX.1-Kontext diffusers folder has")
    return loading.load_kontext_dir(src.path, parts=("scheduler",)).scheduler


def load(plan: LoadPlan) -> LoadedPart:
    """Carry out a plan of :func:`check_load` (what :func:`load_part` does after checking)."""
    return _LOADERS[plan.part](plan)
