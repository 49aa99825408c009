"""Instruction rewriting: the parser on fixed answers, generation on the tiny Qwen2.5-VL, the commands.

The tiny model's weights are random, so its answers are garbage: the generation tests check the
machinery (chat text, generation, decoding, determinism, fallback); the parsing of real answers is
pinned by the fixed strings below.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gie_core.engine.rewrite import (
    REWRITE_PROMPT,
    RewriteResult,
    parse_rewrite,
    rewrite_chat,
    rewrite_instruction,
)

INSTRUCTION = "change the background to a city street"


# --------------------------------------------------------------------------------------
# Parsing fixed answers
# --------------------------------------------------------------------------------------

WELL_FORMED = (
    "Input: A red fire hydrant on a grass verge in soft overcast light.\n"
    "Edit: Replace the entire background beyond the fire hydrant with an urban city street; "
    "maintain the hydrant and the soft overcast lighting.\n"
    "Output: The same hydrant in front of a blurred city street."
)
EDIT = ("Replace the entire background beyond the fire hydrant with an urban city street; "
        "maintain the hydrant and the soft overcast lighting.")


def test_parse_well_formed():
    assert parse_rewrite(WELL_FORMED) == {
        "input": "A red fire hydrant on a grass verge in soft overcast light.",
        "edit": EDIT,
        "output": "The same hydrant in front of a blurred city street.",
    }


def test_parse_reordered_and_any_case():
    text = "OUTPUT: a red cat.\nedit: Make the cat red; keep its pose.\ninput: a grey cat."
    assert parse_rewrite(text) == {"input": "a grey cat.", "edit": "Make the cat red; keep its pose.", "output": "a red cat."}


@pytest.mark.parametrize(
    "text",
    [
        "Sure! Here is the rewrite:\n\n**Input:** A grey cat.\n**Edit:** Make the cat red.\n**Output:** A red cat.\n\nHope this helps!",
        "**Input**: A grey cat.\n**Edit**: Make the cat red.\n**Output**: A red cat.",
        "1. Input: A grey cat.\n2. Edit: Make the cat red.\n3. Output: A red cat.",
        "1. **Input**: A grey cat.\n2. **Edit**: Make the cat red.\n3. **Output**: A red cat.",
        "- input - A grey cat.\n- edit - Make the cat red.\n- output - A red cat.",
        "* Input: A grey cat.\n* Edit: Make the cat red.\n* Output: A red cat.",
        "### Input\nA grey cat.\n\n### Edit\nMake the cat red.\n\n### Output\nA red cat.",
        "Input: A grey cat. Edit: Make the cat red. Output: A red cat.",
        "Input image: A grey cat.\nEdit instruction: \"Make the cat red.\"\nExpected output: A red cat.",
    ],
    ids=["bold-inside", "bold-outside", "numbered", "numbered-bold", "dash-bullets", "star-bullets", "headings",
         "one-line", "long-labels-quoted"],
)
def test_parse_markdown_variants(text):
    assert parse_rewrite(text) == {"input": "A grey cat.", "edit": "Make the cat red.", "output": "A red cat."}


@pytest.mark.parametrize(
    "text",
    [
        '{"input": "A grey cat.", "edit": "Make the cat red.", "output": "A red cat."}',
        'Here you go:\n```json\n{\n  "Input": "A grey cat.",\n  "Edit": "Make the cat red.",\n  "Output": "A red cat."\n}\n```',
        '{"rewrite": {"input": "A grey cat.", "edit_instruction": "Make the cat red.", "output": "A red cat."}}',
        # not valid JSON (single quotes, trailing comma): read line by line
        "{\n  'input': 'A grey cat.',\n  'edit': 'Make the cat red.',\n  'output': 'A red cat.',\n}",
    ],
    ids=["json", "json-fenced", "json-nested", "json-ish"],
)
def test_parse_json(text):
    assert parse_rewrite(text) == {"input": "A grey cat.", "edit": "Make the cat red.", "output": "A red cat."}


def test_parse_partial_edit_only():
    assert parse_rewrite("Edit: Make the cat red.") == {"input": None, "edit": "Make the cat red.", "output": None}
    assert parse_rewrite("Input: A grey cat.\nEdit: Make the cat red.") == {
        "input": "A grey cat.", "edit": "Make the cat red.", "output": None,
    }


def test_parse_multiline_fields_and_trailing_chatter():
    text = (
        "Input: A grey cat\non a blue sofa.\n"
        "Edit: Make the cat red\nand keep the sofa blue.\n"
        "Output: A red cat\non the same sofa.\n\nLet me know if you need anything else."
    )
    assert parse_rewrite(text) == {
        "input": "A grey cat on a blue sofa.",
        "edit": "Make the cat red and keep the sofa blue.",
        "output": "A red cat on the same sofa.",
    }


def test_parse_note_after_edit_is_not_part_of_it():
    assert parse_rewrite("Edit: Make the cat red.\nNote: the sofa stays.")["edit"] == "Make the cat red."


def test_parse_echoed_example_keeps_the_answer():
    text = (
        "Instruction: Change the background to a city street.\nInput: A hydrant.\nEdit: Replace the background.\n"
        "Output: A hydrant in a street.\n\nInstruction: make the cat red\nInput: A grey cat.\nEdit: Make the cat red.\n"
        "Output: A red cat."
    )
    assert parse_rewrite(text) == {"input": "A grey cat.", "edit": "Make the cat red.", "output": "A red cat."}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n ",
        ")rightL\x0f\ufffd andow\x18ow\x18ow\x18ow",
        "I'm sorry, I can't help with that.",
        "Edit the image so the cat is red.",  # a sentence starting with 'Edit', not a field
        "Input: A grey cat.\nOutput: A red cat.",  # no Edit field
        "{\"input\": \"A grey cat.\", \"output\": \"A red cat.\"}",
    ],
    ids=["empty", "blank", "random-tokens", "refusal", "sentence", "no-edit", "json-no-edit"],
)
def test_parse_garbage_is_none(text):
    assert parse_rewrite(text) is None


@pytest.mark.parametrize("text", ["Input: A grey cat.\nEdit:\nOutput: A red cat.", "Edit: N/A", "**Edit:** ...", '{"edit": ""}'])
def test_parse_empty_edit_is_none(text):
    assert parse_rewrite(text) is None


# --------------------------------------------------------------------------------------
# Generation on the tiny Qwen2.5-VL
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(gie_dir):
    from gie_core.weights.loading import load_gie_checkpoint

    return load_gie_checkpoint(gie_dir, dtype="fp32", device="cpu", parts=("encoder",)).encoder


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_chat_has_rewriting_system_block_then_image_then_instruction(encoder):
    text = rewrite_chat(encoder, INSTRUCTION)
    assert text.startswith("<|im_start|>system\n") and "You are a helpful assistant." not in text
    user = text.index("<|im_start|>user\n")
    image_at = text.index("<|vision_start|><|image_pad|><|vision_end|>")
    assert image_at == user + len("<|im_start|>user\n")  # the image comes first in the user turn
    assert text.index(REWRITE_PROMPT.split("{instruction}")[0]) > image_at
    assert f"Instruction: {INSTRUCTION}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_generation_runs_and_garbage_falls_back(encoder, image, caplog):
    with caplog.at_level("WARNING", logger="gie_core.engine.rewrite"):
        result = rewrite_instruction(encoder, image, INSTRUCTION, max_new_tokens=24)
    assert isinstance(result, RewriteResult) and isinstance(result.raw, str) and result.raw
    assert "<|im_end|>" not in result.raw and "<|image_pad|>" not in result.raw  # special tokens skipped
    assert result.fell_back and result.instruction == INSTRUCTION == result.original
    assert result.edit is None and "Edit field" in result.reason
    assert result.reason in caplog.text
    assert result.full_text.startswith("[kept the original instruction:")


def test_greedy_and_seeded_sampling_are_deterministic(encoder, image):
    greedy = [rewrite_instruction(encoder, image, INSTRUCTION, max_new_tokens=16).raw for _ in range(2)]
    assert greedy[0] == greedy[1]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = rewrite_instruction(encoder, image, INSTRUCTION, max_new_tokens=16, temperature=1.0, seed=7).raw
    b = rewrite_instruction(encoder, image, INSTRUCTION, max_new_tokens=16, temperature=1.0, seed=7).raw
    assert a == b
    assert torch.rand(1) == before  # sampling used its own RNG stream, not the caller's
    others = {rewrite_instruction(encoder, image, INSTRUCTION, max_new_tokens=16, temperature=1.0, seed=s).raw for s in (8, 9)}
    assert others != {a}


def test_generation_positions_match_a_full_recompute(encoder, image):
    """Cached generation (mRoPE deltas) picks the same tokens as recomputing the whole sequence."""
    enc = encoder.inputs([image], INSTRUCTION, text=rewrite_chat(encoder, INSTRUCTION))
    encoder.reset_positions()
    out = encoder.model.generate(**enc, max_new_tokens=6, do_sample=False)
    ids = enc["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            step = dict(enc, input_ids=ids, attention_mask=torch.ones_like(ids))
            if "mm_token_type_ids" in enc:  # transformers 5 takes the token types for positions
                step["mm_token_type_ids"] = (ids == encoder.image_token_id).to(torch.int32)
            encoder.reset_positions()
            nxt = encoder.model(**step, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    encoder.reset_positions()
    assert torch.equal(out[0, -6:], ids[0, -6:])


def test_rewriting_leaves_encoding_unchanged(encoder, image):
    """Generation leaves no mRoPE state behind that would shift the next encoding."""
    before = encoder.encode([image], INSTRUCTION).hidden
    rewrite_instruction(encoder, image, INSTRUCTION, max_new_tokens=4)
    assert torch.equal(encoder.encode([image], INSTRUCTION).hidden, before)


def _answer_with(encoder, monkeypatch, answer: str, eos: bool = True):
    """Make generate() answer ``answer`` (tokenized, plus <|im_end|> when ``eos``) after the prompt."""
    tok = encoder.tokenizer
    new = tok(answer, add_special_tokens=False, return_tensors="pt").input_ids
    if eos:
        new = torch.cat([new, torch.tensor([[tok.convert_tokens_to_ids("<|im_end|>")]])], dim=1)
    seen = {}

    def fake_generate(input_ids, generation_config=None, **kwargs):
        seen["config"] = generation_config
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(encoder.model, "generate", fake_generate)
    return seen


def test_well_formed_answer_replaces_the_instruction(encoder, image, monkeypatch):
    seen = _answer_with(encoder, monkeypatch, WELL_FORMED)
    result = rewrite_instruction(encoder, image, INSTRUCTION)
    assert not result.fell_back and result.reason is None
    assert result.instruction == result.edit == EDIT
    assert result.input.startswith("A red fire hydrant") and result.output.startswith("The same hydrant")
    assert result.raw == WELL_FORMED  # only the new tokens are decoded
    assert seen["config"].do_sample is False and seen["config"].max_new_tokens == 256
    assert result.full_text.splitlines()[1] == f"Edit: {EDIT}"


def test_answer_cut_inside_the_edit_falls_back(encoder, image, monkeypatch):
    answer = "Input: A grey cat.\nEdit: Make the cat red and"
    n = encoder.tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids.shape[1]
    _answer_with(encoder, monkeypatch, answer, eos=False)
    result = rewrite_instruction(encoder, image, INSTRUCTION, max_new_tokens=n)
    assert result.truncated and result.fell_back and "max_new_tokens" in result.reason
    assert result.instruction == INSTRUCTION


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(instruction=""), ValueError, "instruction is empty"),
        (dict(instruction="   "), ValueError, "instruction is empty"),
        (dict(instruction=None), TypeError, "instruction must be a string"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens is 0 but must be between 1 and 2048"),
        (dict(max_new_tokens=4096), ValueError, "max_new_tokens is 4096"),
        (dict(max_new_tokens=1.5), TypeError, "max_new_tokens must be an integer"),
        (dict(temperature=-0.1), ValueError, "temperature is -0.1 but must be >= 0"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(seed=-1), ValueError, "seed is -1"),
        (dict(prompt="no placeholder"), ValueError, "must contain '{instruction}'"),
    ],
)
def test_invalid_inputs_are_rejected(encoder, image, kwargs, error, match):
    kwargs = {"instruction": INSTRUCTION, **kwargs}
    with pytest.raises(error, match=match):
        rewrite_instruction(encoder, image, kwargs.pop("instruction"), **kwargs)


def test_too_small_image_is_rejected(encoder):
    with pytest.raises(ValueError, match="must be at least"):
        rewrite_instruction(encoder, Image.new("RGB", (4, 4)), INSTRUCTION)


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, image):
    path = tmp_path_factory.mktemp("rewrite") / "in.png"
    image.save(path)
    return path


def test_gie_rewrite_json(gie_dir, image_file, capsys):
    from gie_core.cli.rewrite import main

    rc = main([str(image_file), INSTRUCTION, "--model", str(gie_dir), "--max-new-tokens", "12", "--json",
               "--device", "cpu", "--dtype", "fp32"])
    out, err = capsys.readouterr()
    assert rc == 0
    result = json.loads(out)
    assert result["fell_back"] is True and result["instruction"] == INSTRUCTION and isinstance(result["raw"], str)
    assert "gie-rewrite: warning: kept the original instruction" in err and result["reason"] in err
    assert err.count(result["reason"]) == 1  # the library's log record is not printed a second time


def test_gie_rewrite_plain_prints_the_instruction(gie_dir, image_file, capsys):
    from gie_core.cli.rewrite import main

    assert main([str(image_file), INSTRUCTION, "--model", str(gie_dir), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == INSTRUCTION + "\n"


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--max-new-tokens", "0"], "max_new_tokens is 0"),
        (["--temperature", "-1"], "temperature is -1.0"),
    ],
)
def test_gie_rewrite_bad_options_exit_2(gie_dir, image_file, capsys, extra, match):
    from gie_core.cli.rewrite import main

    assert main([str(image_file), INSTRUCTION, "--model", str(gie_dir), *extra]) == 2
    assert match in capsys.readouterr().err


def test_gie_rewrite_missing_inputs_exit_2(gie_dir, image_file, tmp_path, capsys):
    from gie_core.cli.rewrite import main

    assert main([str(tmp_path / "none.png"), INSTRUCTION, "--model", str(gie_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(image_file), INSTRUCTION, "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gie_edit_rewrite(gie_dir, kontext_dir, image_file, tmp_path, capsys):
    from gie_core.cli.edit import main

    out = tmp_path / "out.png"
    rc = main([str(image_file), INSTRUCTION, "-o", str(out), "--model", str(gie_dir), "--kontext", str(kontext_dir),
               "--steps", "1", "--size", "64x64", "--reference-size", "keep", "--dtype", "fp32", "--device", "cpu",
               "--quiet", "--rewrite", "--rewrite-max-tokens", "8"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "gie-edit: warning: --rewrite kept the original instruction" in captured.err  # tiny model: garbage
    with Image.open(out) as im:
        assert im.size == (64, 64)


def test_gie_edit_rewrite_needs_the_vlm(kontext_dir, image_file, tmp_path, capsys):
    from gie_core.cli.edit import main

    rc = main([str(image_file), INSTRUCTION, "-o", str(tmp_path / "o.png"), "--kontext", str(kontext_dir), "--rewrite",
               "--device", "cpu"])
    assert rc == 2
    assert "--rewrite needs the Qwen2.5-VL" in capsys.readouterr().err
