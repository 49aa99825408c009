"""What the ``gie-*`` commands share: the error contract, help text, input images, outputs, device and dtype.

Exit codes: 0 done; 2 bad input (a message naming the input, nothing written); 1 a failure
while running (e.g. the output folder became unwritable, the disk full); 130 interrupted (nothing
written, or, for ``--jobs``, a message counting the complete outputs written and where).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from gie_core.files import atomic_write, check_output_path, describe_os_error

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


# reStructuredText in docstrings: :func:`x`, :mod:`~a.b`, ``x``, `x`
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_INTERPRETED = re.compile(r"`([^`]+)`")
# "default 28", "(default: ...)", "white (default)"; not a value named default ("default (1:1, 3:2, 2:3)")
_SAYS_DEFAULT = re.compile(r"\bdefaults?\b(?!\s*\()", re.I)


def plain_text(text: str) -> str:
    """Docstring text as the terminal shows it: reStructuredText markup (``x``, `x`, :func:`x`,
    :mod:`x`...) becomes the bare text; lines and paragraphs are kept."""
    text = _RST_ROLE.sub(r"\1", text)
    text = _RST_LITERAL.sub(r"\1", text)
    return _RST_INTERPRETED.sub(r"\1", text)


def help_with_default(text: str, default) -> str:
    """The one rule for how an option's default shows in ``--help``: where the help text already
    says its default in words ("default 28", "(default: ~1 MP at ...)"), that is all; otherwise
    " (default: VALUE)" is appended, and nothing where there is no default value (None, "", []).
    The result is an argparse help string (a ``%`` in VALUE is escaped)."""
    if _SAYS_DEFAULT.search(text) or default is None or default is argparse.SUPPRESS:
        return text
    if isinstance(default, (str, list, tuple, dict)) and not default:
        return text
    return f"{text} (default: {str(default).replace('%', '%%')})"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The ``--help`` of every ``gie-*`` command: plain text, each option's default said once
    (:func:`help_with_default`). In descriptions and epilogs a paragraph written on one line is
    wrapped to the terminal; lines broken by hand (examples, tables) are kept as written."""

    def _fill_text(self, text, width, indent):
        paragraphs = plain_text(text).split("\n\n")
        return "\n\n".join(
            textwrap.fill(para, width, initial_indent=indent, subsequent_indent=indent,
                          break_long_words=False, break_on_hyphens=False)
            if "\n" not in para.strip("\n") else super(HelpFormatter, self)._fill_text(para, width, indent)
            for para in paragraphs
        )

    def _get_help_string(self, action):
        text = plain_text(action.help or "")
        if action.option_strings and action.nargs != 0:  # a flag (store_true...) has no value to show
            text = help_with_default(text, action.default)
        return text


def load_input(path: str, what: str = "input image", background="white"):
    """An input image file as RGB (EXIF orientation, 16-bit and alpha handled; see
    :func:`gie_core.imaging.images.load_image`)."""
    from gie_core.imaging.images import load_image

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
    from gie_core.constants import LOAD_DEFAULTS
    from gie_core.engine.request import resolve_device
    from gie_core.weights.parts import dtype_name

    dev = resolve_device(device)
    return dev, dtype_name(dtype or LOAD_DEFAULTS["cli"].dtype, dev)


def quiet_library_warnings() -> None:
    """The commands say why the rewriter fell back themselves; keep the library's log record from
    printing it twice (Python prints warnings of unconfigured logging to stderr)."""
    log = logging.getLogger("gie_core.engine.rewrite")
    if not logging.getLogger().handlers and not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
