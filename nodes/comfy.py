"""The only module that touches ComfyUI: model folders, devices, memory, progress, interrupt, server.

Each ComfyUI module (``folder_paths``, ``comfy.model_management``, ``comfy.utils``, ``server``) is imported
on first use and may be missing: then the plain fallbacks below apply (gie_core's default
device, no progress bar, an interrupt flag, model folders from a registry that tests and tools
set with :func:`set_model_roots`), so the nodes import and run without ComfyUI.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from gie_core.engine.request import resolve_device

# Our model folders: one sub-directory per GPT-Image-Edit checkpoint (the released layout), and
# single connector files (gie-convert's gie_connectors/; remappable in extra_model_paths.yaml).
GIE_FOLDER = "gpt_image_edit"
CONNECTOR_FOLDER = "gie_connectors"

# What marks a usable sub-directory in each folder kind.
DIR_MARKERS = {GIE_FOLDER: "config.json", "diffusers": "model_index.json"}
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".gguf")
_SCAN_DEPTH = 2  # models/diffusers/<org>/<name> is as deep as people nest them

_modules: dict[str, object] = {}
_fallback_roots: dict[str, list[str]] = {}
_interrupt = threading.Event()


def _optional(name: str):
    """The ComfyUI module ``name``, or None without ComfyUI (the answer is cached)."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(name)
        except ImportError:
            _modules[name] = None
    return _modules[name]


def reset() -> None:
    """Forget which ComfyUI modules were found (tests swap fake ones in)."""
    _modules.clear()


def folder_paths():
    return _optional("folder_paths")


def model_management():
    return _optional("comfy.model_management")


def comfy_utils():
    return _optional("comfy.utils")


def have_comfy() -> bool:
    return folder_paths() is not None and model_management() is not None


def prompt_server():
    """ComfyUI's running server (``server.PromptServer.instance``), or None outside ComfyUI."""
    server = _optional("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def aiohttp_web():
    """``aiohttp.web`` (ComfyUI's server is built on it), or None where it is not installed."""
    return _optional("aiohttp.web")


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------


def register_model_folder() -> None:
    """Register ``models/gpt_image_edit`` (checkpoint directories) and ``models/gie_connectors``
    (connector files) with ComfyUI's folder list.

    Paths users add for these names in ``extra_model_paths.yaml`` stay; ours go first.
    """
    fp = folder_paths()
    if fp is None:
        return
    for name in (GIE_FOLDER, CONNECTOR_FOLDER):
        path = os.path.join(fp.models_dir, name)
        with contextlib.suppress(OSError):  # a read-only install still lists the other folders
            os.makedirs(path, exist_ok=True)
        fp.add_model_folder_path(name, path, is_default=True)
    # GGUF transformers in diffusion_models (as ComfyUI-GGUF registers them): our model loader reads them
    for name in ("diffusion_models", "unet"):
        entry = getattr(fp, "folder_names_and_paths", {}).get(name)
        if entry is not None and isinstance(entry[1], set):
            entry[1].add(".gguf")


def set_model_roots(roots: dict[str, list[str | os.PathLike]]) -> None:
    """Model folders for use without ComfyUI, e.g. ``{"diffusers": [path], "loras": [path]}``."""
    _fallback_roots.clear()
    _fallback_roots.update({k: [str(p) for p in v] for k, v in roots.items()})


def model_folders(kind: str) -> list[str]:
    """The directories of a model folder kind (``diffusers``, ``loras``, ``gpt_image_edit``...)."""
    fp = folder_paths()
    if fp is not None:
        try:
            return list(fp.get_folder_paths(kind))
        except KeyError:
            return []
    return list(_fallback_roots.get(kind, []))


def list_model_dirs(kind: str) -> list[str]:
    """Sub-directories (relative names, ``/``-separated) holding the kind's marker file."""
    marker = DIR_MARKERS[kind]
    found: set[str] = set()
    for root in model_folders(kind):
        base = Path(root)
        if not base.is_dir():
            continue
        stack = [(base, 0)]
        while stack:
            d, depth = stack.pop()
            try:
                with os.scandir(d) as it:
                    entries = sorted(e.path for e in it if e.is_dir(follow_symlinks=True))
            except OSError:
                continue
            for entry in entries:
                p = Path(entry)
                if (p / marker).is_file():
                    found.add(p.relative_to(base).as_posix())
                elif depth + 1 < _SCAN_DEPTH:
                    stack.append((p, depth + 1))
    return sorted(found)


def resolve_model_dir(kind: str, name: str) -> Path:
    """The full path of a sub-directory listed by :func:`list_model_dirs`."""
    listed = list_model_dirs(kind)
    if name in listed:  # only listed names: no path outside the model folders
        for root in model_folders(kind):
            p = Path(root) / name
            if (p / DIR_MARKERS[kind]).is_file():
                return p
    listed = ", ".join(listed) or "none"
    raise FileNotFoundError(
        f"'{name}' is not a model directory in models/{kind} (found: {listed}); "
        f"put the folder in one of: {', '.join(model_folders(kind)) or 'models/' + kind}"
    )


def list_model_files(kind: str) -> list[str]:
    """Weight files of a folder kind (relative names), as ComfyUI's dropdowns list them."""
    fp = folder_paths()
    if fp is not None:
        try:
            names = fp.get_filename_list(kind)
        except KeyError:
            return []
        return [n for n in names if n.lower().endswith(MODEL_FILE_SUFFIXES)]
    found: set[str] = set()
    for root in model_folders(kind):
        base = Path(root)
        if base.is_dir():
            for p in base.rglob("*"):
                if p.is_file() and p.suffix.lower() in MODEL_FILE_SUFFIXES:
                    found.add(p.relative_to(base).as_posix())
    return sorted(found)


def resolve_model_file(kind: str, name: str) -> Path:
    """The full path of a weight file listed by :func:`list_model_files`."""
    fp = folder_paths()
    if fp is not None:
        full = fp.get_full_path(kind, name)
        if full is not None:
            return Path(full)
    elif name in list_model_files(kind):
        for root in model_folders(kind):
            if (Path(root) / name).is_file():
                return Path(root) / name
    raise FileNotFoundError(
        f"'{name}' is not a file in models/{kind} (folders: {', '.join(model_folders(kind)) or 'none'})"
    )


def _comfy_package_dir() -> Path | None:
    """The folder of ComfyUI's ``comfy`` package (its bundled tokenizers live there), if present."""
    comfy = _optional("comfy")
    if comfy is None or not getattr(comfy, "__path__", None):
        return None
    return Path(list(comfy.__path__)[0])


def bundled_qwen_tokenizer_dir() -> Path | None:
    """ComfyUI's own Qwen2.5 tokenizer folder (what its Qwen-Image text encoder uses), if present."""
    root = _comfy_package_dir()
    path = root / "text_encoders" / "qwen25_tokenizer" if root is not None else None
    return path if path is not None and path.is_dir() else None


def bundled_tokenizer_dirs() -> tuple[Path, Path] | None:
    """ComfyUI's own CLIP-L and T5 tokenizer folders (shipped in its source tree), if present."""
    root = _comfy_package_dir()
    if root is None:
        return None
    clip, t5 = root / "sd1_tokenizer", root / "text_encoders" / "t5_tokenizer"
    if clip.is_dir() and t5.is_dir():
        return clip, t5
    return None


# ---------------------------------------------------------------------------------------------
# Devices, memory, progress, interrupt
# ---------------------------------------------------------------------------------------------


def torch_device() -> torch.device:
    """ComfyUI's compute device (it honours --cpu, --directml...), else gie_core's default."""
    mm = model_management()
    if mm is not None:
        return torch.device(mm.get_torch_device())
    return resolve_device(None)


def make_room(nbytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until ``nbytes`` fit on ``device``."""
    mm = model_management()
    if mm is not None and hasattr(mm, "free_memory"):
        mm.free_memory(int(nbytes * 1.1) + (256 << 20), device)


def empty_cache() -> None:
    """Release cached device memory (ComfyUI's soft_empty_cache when present)."""
    mm = model_management()
    if mm is not None and hasattr(mm, "soft_empty_cache"):
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def step_callbacks(total: int):
    """``(progress, preview)`` for the sampler: ComfyUI's progress bar, with latent previews from
    ComfyUI's own previewer (``--preview-method``: Latent2RGB or TAESD for FLUX) when it is on.
    Without ComfyUI: no-ops."""
    utils, lp, formats = comfy_utils(), _optional("latent_preview"), _optional("comfy.latent_formats")
    if utils is None:
        return (lambda done, total_: None), None
    bar = utils.ProgressBar(total)
    previewer = None
    if lp is not None and formats is not None:
        with contextlib.suppress(Exception):  # a preview is a nicety: never fail a run for it
            previewer = lp.get_previewer(torch_device(), formats.Flux())
    if previewer is None:
        return (lambda done, total_: bar.update_absolute(done, total_)), None

    def preview(done: int, total_: int, x0: torch.Tensor) -> None:
        image = None
        with contextlib.suppress(Exception):
            image = previewer.decode_latent_to_preview_image("JPEG", x0)
        bar.update_absolute(done, total_, image)

    return None, preview


def request_interrupt() -> None:
    """Without ComfyUI: ask the running sampler to stop (ComfyUI's own flag is used otherwise)."""
    _interrupt.set()


def interrupt_check() -> Callable[[], bool]:
    """The sampler's interrupt callback: raises ComfyUI's InterruptProcessingException when the
    user pressed Cancel; without ComfyUI, True once after :func:`request_interrupt`."""
    mm = model_management()
    if mm is not None:
        def check() -> bool:
            mm.throw_exception_if_processing_interrupted()
            return False

        return check

    def check_flag() -> bool:
        if _interrupt.is_set():
            _interrupt.clear()  # consumed, as ComfyUI resets its flag when it raises
            return True
        return False

    return check_flag


def blocked():
    """What a node returns for an output it does not produce this run (a turn routed to an
    answer makes no conditioning): ComfyUI's ``ExecutionBlocker(None)``, which silently skips
    every node that needs that output; None without ComfyUI."""
    for name in ("comfy_execution.graph_utils", "comfy_execution.graph"):  # it moved between releases
        blocker = getattr(_optional(name), "ExecutionBlocker", None)
        if blocker is not None:
            return blocker(None)
    return None
