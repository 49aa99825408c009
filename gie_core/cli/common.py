"""What the ``gie-*`` commands share: the error contract, help text, input images, outputs, device and dtype.

Exit codes: 0 done; 2 bad input (a message naming the input, nothing written); 1 a failure
while running (e.g. the output folder became unwritable, the disk full); 130 interrupted (nothing
written, or, for ``--jobs``, a message counting the complete outputs written and where).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from gie_core.constants import LOAD_DEFAULTS
from gie_core.engine.request import resolve_device
from gie_core.files import atomic_write, check_output_path, describe_os_error
from gie_core.imaging.images import load_image
from gie_core.weights.parts import dtype_name

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def run_command(prog: str, run: Callable[[], int]) -> int:
    """Run a command body with the shared error contract (see the module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    try:
        return run()
    except (ValueError, TypeError) as exc:  # CheckpointError, DataError, ConfigError are ValueErrors
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a run that wrote some outputs says so (e.g. engine.jobs.JobsInterrupted)
        print(f"{prog}: interrupted {exc}" if str(exc) else f"{prog}: interrupted; no output written", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, folder removed or made read-only while running
        print(f"{prog}: error: {describe_os_error(exc)}; no partial output was left", file=sys.stderr)
        return 1


def load_input(path: str, what: str = "input image", background="white"):
    """An input image file as RGB (EXIF orientation, 16-bit and alpha handled; see
    :func:`gie_core.imaging.images.load_image`)."""
    return load_image(path, what, background=background)


def output_paths(output: str, count: int) -> list[Path]:
    """The files one run writes: ``output`` itself, or ``stem_0.png`` ... for several images.
    Every one is checked writable now, before anything loads."""
    out = Path(output)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output '{output}' must end in {', '.join(OUTPUT_SUFFIXES)}")
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]
    for p in paths:
        check_output_path(p, "output")
    return paths


def save_image(image, path: Path) -> None:
    """Write an image atomically (a failed save never leaves a partial file or replaces a good one)."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix.lower()]
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


def device_and_dtype(device: str | None, dtype: str | None):
    """The checked device (a missing CUDA is refused here, before loading) and the dtype name:
    the CLI's default (``LOAD_DEFAULTS["cli"]``: "auto", bf16 on GPUs, fp32 on the CPU) unless given."""
    dev = resolve_device(device)
    return dev, dtype_name(dtype or LOAD_DEFAULTS["cli"].dtype, dev)


def quiet_library_warnings() -> None:
    """The commands say why the rewriter fell back themselves; keep the library's log record from
    printing it twice (Python prints warnings of unconfigured logging to stderr)."""
    log = logging.getLogger("gie_core.engine.rewrite")
    if not logging.getLogger().handlers and not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
