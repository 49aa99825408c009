"""Every gie-* --help is plain text and says each option's default once."""

from __future__ import annotations

import argparse
import re

import pytest

from gie_core.cli import ask, comfy_run, convert, edit, rewrite, train
from gie_core.cli import eval as eval_cli
from gie_core.cli.help import HelpFormatter, help_with_default, plain_text

MARKUP = re.compile(r"`|:(func|mod|class|meth|data|attr):")
APPENDED_DEFAULT = re.compile(r"\s*\(default: [^()]*\)$")
SAYS_DEFAULT = re.compile(r"\bdefaults?\b(?!\s*\()", re.I)


def parsers() -> dict[str, argparse.ArgumentParser]:
    found = {"gie-edit": edit.build_parser(), "gie-ask": ask.build_parser(), "gie-rewrite": rewrite.build_parser(),
             "gie-convert": convert.build_parser(), "gie-comfy-run": comfy_run.build_parser()}
    found |= {f"gie-train {c}" if c != "train" else "gie-train": train.build_parser(c) for c in train.COMMANDS}
    found["gie-eval"] = top = eval_cli.build_parser()
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            found |= {f"gie-eval {name}": sub for name, sub in action.choices.items()}
    return found


PARSERS = parsers()


def option_helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help as --help prints it (one line)."""
    formatter = parser._get_formatter()
    return {"/".join(a.option_strings) or a.dest: " ".join(formatter._expand_help(a).split())
            for a in parser._actions if a.help and a.help != argparse.SUPPRESS}


def default_said_twice(text: str) -> bool:
    """An appended "(default: X)" after a help that already says its default, or a default of None."""
    m = APPENDED_DEFAULT.search(text)
    return bool(m) and (bool(SAYS_DEFAULT.search(text[:m.start()])) or m.group(0).strip() == "(default: None)")


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_is_plain_text(name):
    text = PARSERS[name].format_help()
    assert not MARKUP.search(text), f"{name} --help shows markup: {MARKUP.search(text).group(0)!r}"
    assert isinstance(PARSERS[name].formatter_class(name), HelpFormatter)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_says_each_default_once(name):
    twice = {flag: text for flag, text in option_helps(PARSERS[name]).items() if default_said_twice(text)}
    assert twice == {}


def test_the_checks_catch_the_old_help():
    """What the help used to show is caught: RST markup and a default said in words and appended."""
    assert MARKUP.search("(``--optim.lr 1e-4``)") and MARKUP.search("see :func:`gie_core.x`")
    assert default_said_twice("learning rate (default: 1e-3 in stage 1, 1e-6 in stage 2) (default: None)")
    assert default_said_twice("where exported weights go (default output_dir/export) (default: None)")
    assert not default_said_twice("steps (default: 28)") and not default_said_twice("sets: default (1:1), kontext (default: default)")


def test_one_rule_for_defaults():
    assert help_with_default("sampling steps", 28) == "sampling steps (default: 28)"
    assert help_with_default("sampling steps (default 28)", 28) == "sampling steps (default 28)"
    assert help_with_default("a folder", None) == "a folder"
    assert help_with_default("pairs", []) == "pairs"
    assert help_with_default("tensorboard logs", False) == "tensorboard logs (default: False)"
    assert help_with_default("a share", "5%") == "a share (default: 5%%)"  # argparse expands % in help
    assert plain_text("``gie-train``: see :func:`~gie_core.x.y` and :mod:`gie_core.z`, `accelerate launch`") == \
        "gie-train: see gie_core.x.y and gie_core.z, accelerate launch"


def test_edit_help_says_what_a_zero_size_means():
    size = option_helps(PARSERS["gie-edit"])["--size"]
    assert "0x0" in size and "auto" in size and "a side 0 follows the input's aspect" in size
    assert "0x0" in option_helps(PARSERS["gie-eval generate"])["--size"]
    # and it does mean auto: the same as 'auto'
    assert edit.parse_size("0x0") == edit.parse_size("auto") == (0, 0)
