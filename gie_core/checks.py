"""Range checks every face shares: whole numbers, finite numbers and known choices.

The ground floor of the package: it imports nothing from ``gie_core`` (the constants that give
the ranges are passed in), so the request resolver, the speed choices, the job lists, the
nodes, the command lines and the trainer can all check with the same words without importing
each other. Each check returns the value (normalised) or raises ``ValueError`` naming the
input, the value and what was expected.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import numbers

__all__ = ["check_choice", "check_float", "check_int", "import_problem"]


def import_problem(package: str, install: str) -> str:
    """Why the optional ``package`` cannot be used here ("" when it imports): not installed, or
    installed but failing at import (a wheel built for another torch or CUDA raises ImportError,
    OSError or RuntimeError there). ``install`` says how to get a working one. Asked before any
    weight is read, so a run says so at once instead of failing minutes later."""
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed ({install})"
    try:
        importlib.import_module(package)
    except Exception as exc:  # noqa: BLE001 - a broken binary raises ImportError, OSError or RuntimeError
        first = str(exc).splitlines()[0] if str(exc) else ""
        try:
            torch_version = importlib.metadata.version("torch")  # without importing torch
        except importlib.metadata.PackageNotFoundError:
            torch_version = "(none)"
        return (f"{package} is installed but does not import with torch {torch_version} "
                f"({type(exc).__name__}: {first}); "
                f"install a build for this torch ({install})")
    return ""


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``lo..hi`` (inclusive), else ``ValueError`` naming ``name``.
    A float with a whole value (``3.0``) is taken as that int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} is {value!r} but must be a whole number")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} is {value} but must be in {_span(lo, hi)}")
    return value


def check_float(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a finite float in ``lo..hi`` (inclusive), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} is {value!r} but must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} is {value} but must be a finite number in {_span(lo, hi)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} is {value:g} but must be in {_span(lo, hi)}")
    return value


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"{name} is {value!r} but must be one of {', '.join(map(str, choices))}")
    return value


def _span(lo, hi) -> str:
    """'lo..hi', '>= lo' or '<= hi': the range in an error message."""
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"
