"""How every ``gie-*`` command's ``--help`` reads: plain text (no reStructuredText markup from the
docstrings it is built from) and each option's default said once.

Standard library only: ``gie-comfy-run`` (a light client that never imports torch) uses it too.
"""

from __future__ import annotations

import argparse
import re
import textwrap

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
