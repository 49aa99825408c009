"""Instruction rewriting with the loaded Qwen2.5-VL ("thinking-rewritten" prompts).

The reference's best scores use instructions rewritten at inference into three fields: *input*
(what is visible), *edit* (the exact change, naming what to keep) and *output* (the expected
result); only the *edit* field replaces the instruction. The reference asked a hosted LLM; here
the Qwen2.5-VL that GPT-Image-Edit already loads as its encoder generates the fields, offline.

Greedy decoding by default (the same image and instruction give the same rewrite). When the
answer has no usable Edit field, the original instruction is kept and the result says why.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass

import torch

from gie_core.engine.conversation import render_qwen_prompt
from gie_core.engine.encoders import check_instruction
from gie_core.imaging.images import ImageLike

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS_LIMIT = 2048
DEFAULT_MAX_NEW_TOKENS = 256
# Qwen2.5-VL's own generation_config.json uses 1.05; the released GIE checkpoint ships none.
DEFAULT_REPETITION_PENALTY = 1.05

REWRITE_SYSTEM = (
    "You are an expert editor of instructions for an image-editing model. You look carefully at the "
    "image and rewrite the user's edit instruction so that the editing model can follow it exactly."
)

# ``{instruction}`` is replaced by the user's instruction (plain replace: the text may hold braces).
REWRITE_PROMPT = """\
Rewrite the edit instruction below for this image. Answer with exactly three labelled fields and nothing else:
Input: what is visible in the image that matters for the edit (one or two sentences).
Edit: the exact change to make, as one explicit instruction; say what must stay unchanged.
Output: what the edited image should look like (one or two sentences).

Rules:
- Be conservative: base everything only on what is visible in the image; do not invent objects or details.
- Do not add changes the user did not ask for.
- Keep everything the instruction does not mention: subjects, identity, pose, composition, lighting, colours and style.
- Write in English, plainly, without markdown.

Example:
Instruction: Change the background to a city street.
Input: A red fire hydrant stands on a grass verge, photographed close up in soft overcast light with a shallow depth of field.
Edit: Replace the entire background beyond the fire hydrant with an urban city street; maintain the hydrant, its position and colour, the soft overcast lighting and the shallow depth of field.
Output: The same red fire hydrant in the foreground, now in front of a softly blurred city street.

Instruction: {instruction}"""

FIELDS = ("input", "edit", "output")


@dataclass
class RewriteResult:
    """One rewrite: ``instruction`` is what to edit with (the Edit field, or the original on fallback)."""

    instruction: str
    original: str
    input: str | None
    edit: str | None
    output: str | None
    raw: str  # the model's answer, decoded without special tokens
    fell_back: bool
    reason: str | None  # why the original was kept; None when the rewrite is used
    truncated: bool = False  # generation stopped at max_new_tokens, not at the end of the answer

    @property
    def full_text(self) -> str:
        """The three fields as text (for display), or the fallback reason and the raw answer."""
        if self.fell_back:
            return f"[kept the original instruction: {self.reason}]\n{self.raw}".rstrip()
        lines = [("Input", self.input), ("Edit", self.edit), ("Output", self.output)]
        return "\n".join(f"{label}: {value}" for label, value in lines if value)

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return asdict(self)


# --------------------------------------------------------------------------------------
# Parsing the answer
# --------------------------------------------------------------------------------------

# Line decorations before a label: quote marks, headings, bullets, numbering ("2.", "2)", "(2)").
_LEAD = re.compile(r"^(?:>+|#{1,6}|[-*+\u2022\u2013\u2014](?=\s)|\(?\d{1,2}[.):](?=\s|\*|_|[A-Za-z])|\[\d{1,2}\])\s*")
_EMPH = r"(?:\*\*|__|\*|_)?"
_LABEL = re.compile(
    rf"^{_EMPH}\s*[\"'`]?(?:expected\s+|edited\s+|original\s+)?(?P<label>input|edit|output)"
    r"(?:\s+(?:instruction|image|description|result|field|prompt))?"
    rf"[\"'`]?\s*{_EMPH}\s*(?P<sep>[:\uff1a=]|[-\u2013\u2014]+(?=\s|$)|$)\s*{_EMPH}\s*",
    re.IGNORECASE,
)
# Labels that are not ours but end a field (an echoed instruction, an appended note).
_STOP = re.compile(
    rf"^{_EMPH}\s*(?:instruction|original instruction|example|note|notes|explanation|reasoning|rewritten instruction)"
    rf"\s*{_EMPH}\s*[:\uff1a]",
    re.IGNORECASE,
)
# Inline labels ("Input: ... . Edit: ... . Output: ...") after a sentence end: split into lines.
_INLINE = re.compile(r"(?<=[.!?;\"')\]])\s+(?=(?:\*\*|__)?(?:input|edit|output)(?:\*\*|__)?\s*[:\uff1a])", re.IGNORECASE)
_FENCE = re.compile(r"^\s*(?:```|[{}\[\]],?\s*$)")  # code fences and lone JSON braces end a field
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
_EMPTY_VALUES = {"", "n/a", "na", "none", "null", "-", "..."}


def _clean_value(text: str) -> str:
    """Join lines; strip markdown emphasis, wrapping quotes and a trailing JSON comma."""
    s = " ".join(text.split()).rstrip(",").strip()
    changed = True
    while changed and s:
        changed = False
        for a, b in (("**", "**"), ("__", "__"), ('"', '"'), ("'", "'"), ("`", "`"), ("\u201c", "\u201d")):
            if len(s) > len(a) + len(b) and s.startswith(a) and s.endswith(b):
                s, changed = s[len(a):-len(b)].strip(), True
    for mark in ("**", "__"):  # a lone bold mark left over at either end
        if s.count(mark) % 2:
            s = s[len(mark):] if s.startswith(mark) else s[:-len(mark)] if s.endswith(mark) else s
    return s.strip()


def _usable(value: str | None) -> bool:
    return bool(value) and value.strip().lower() not in _EMPTY_VALUES and any(c.isalpha() for c in value)


def _fields_from_json(text: str) -> dict | None:
    """The fields of a JSON object in the text (also nested one level, e.g. {"rewrite": {...}})."""
    m = _JSON_OBJECT.search(text)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
    except (json.JSONDecodeError, ValueError):
        return None
    candidates = [obj] + ([v for v in obj.values() if isinstance(v, dict)] if isinstance(obj, dict) else [])
    for cand in candidates:
        if not isinstance(cand, dict):
            continue
        found = {}
        for key, value in cand.items():
            k = re.sub(r"[\s_-]+", " ", str(key)).strip().lower()
            k = re.sub(r"^(?:expected|edited|original) ", "", k)
            k = re.sub(r" (?:instruction|image|description|result)$", "", k)
            if k in FIELDS and isinstance(value, str):
                found[k] = _clean_value(value)
        if "edit" in found:
            return found
    return None


def _label_of(line: str) -> tuple[str, str] | None:
    """(field, rest of the line) when the line starts with one of our labels."""
    s = line.strip()
    while True:
        m = _LEAD.match(s)
        if not m or not m.group(0):
            break
        s = s[m.end():]
    m = _LABEL.match(s)
    if not m:
        return None
    rest = s[m.end():]
    if not m.group("sep") and rest.strip():
        return None  # "Edit the sky ..." is a sentence, not a label
    return m.group("label").lower(), rest


def _fields_from_labels(text: str) -> dict:
    """Fields from labelled lines; a field runs over the following lines up to a blank line
    (once it has text), another label or a code fence. A repeated label keeps the last one
    with text (a model that echoes the example answers after it)."""
    found: dict[str, str] = {}
    current: str | None = None
    buf: list[str] = []

    def close():
        if current is not None:
            value = _clean_value(" ".join(buf))
            if _usable(value) or current not in found:
                found[current] = value

    lines = []
    for raw in text.splitlines():
        pieces = _INLINE.split(raw)
        if len(pieces) == 1:
            lines.append(raw)
            continue
        for i in range(len(pieces) - 1):  # "2." of "2. **Edit**:" is numbering, not a sentence end
            if not any(c.isalpha() for c in pieces[i]):
                pieces[i], pieces[i + 1] = "", f"{pieces[i]} {pieces[i + 1]}"
        lines.extend(p for p in pieces if p)
    for line in lines:
        labelled = _label_of(line)
        if labelled is not None:
            close()
            current, first = labelled
            buf = [first] if first.strip() else []
            continue
        if _FENCE.match(line) or _STOP.match(line.strip().lstrip("#>-*+ ")):
            close()
            current, buf = None, []
            continue
        if current is None:
            continue  # chatter before the first label
        if not line.strip():
            if buf:  # a blank line ends a field once it has text
                close()
                current, buf = None, []
            continue
        buf.append(line.strip())
    close()
    return found


def _parse(text: str) -> tuple[dict | None, str | None]:
    """(fields, None) or (None, why not)."""
    if not isinstance(text, str) or not text.strip():
        return None, "the model's answer is empty"
    found = _fields_from_json(text)
    if found is None:
        found = _fields_from_labels(text)
    if "edit" not in found:
        return None, "could not find an Edit field in the model's answer"
    if not _usable(found["edit"]):
        return None, "the Edit field in the model's answer is empty"
    return {k: (found.get(k) if _usable(found.get(k)) else None) for k in FIELDS}, None


def parse_rewrite(text: str) -> dict | None:
    """The ``input`` / ``edit`` / ``output`` fields of a rewriting answer, or None.

    Robust to field order, case, markdown (``**Edit:**``, ``- edit -``, ``2. Edit:``, headings),
    JSON objects (also in code fences), chatter around the fields and multi-line fields. Input
    and Output may be missing (then None); without a non-empty Edit field the answer is unusable
    and None is returned.
    """
    return _parse(text)[0]


# --------------------------------------------------------------------------------------
# Generating the answer
# --------------------------------------------------------------------------------------


def check_rewrite_options(max_new_tokens: int, temperature: float, seed: int, top_p: float) -> None:
    """Reject out-of-range generation options with a message naming the option and the range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an integer, not {type(max_new_tokens).__name__}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens is {max_new_tokens} but must be between 1 and {MAX_NEW_TOKENS_LIMIT}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature is {temperature!r} but must be a finite number >= 0 (0 = greedy)")
    if temperature < 0:
        raise ValueError(f"temperature is {temperature} but must be >= 0 (0 = greedy, deterministic)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, not {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed is {seed} but must be between 0 and 2**64 - 1")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p is {top_p!r} but must be in (0, 1]")


def rewrite_chat(encoder, instruction: str, prompt: str = REWRITE_PROMPT, system: str = REWRITE_SYSTEM) -> str:
    """The chat text for rewriting: a system block with the rewriting role, then the user turn with
    the image first and the rewriting prompt holding the instruction, then the assistant prompt."""
    check_instruction(instruction)
    if "{instruction}" not in prompt:
        raise ValueError("the rewriting prompt must contain '{instruction}' where the instruction goes")
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": [
            {"type": "image"},  # image first, as in encoding
            {"type": "text", "text": prompt.replace("{instruction}", instruction.strip())},
        ]},
    ]
    return render_qwen_prompt(messages)  # never the tokenizer folder's template (it may be text-only)


def _stop_token_ids(tokenizer) -> list[int]:
    ids = []
    for tok in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.append(i)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_rewrite(
    encoder,
    image: ImageLike,
    instruction: str,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    seed: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    prompt: str = REWRITE_PROMPT,
) -> tuple[str, bool]:
    """(decoded answer, truncated) from the encoder's Qwen2.5-VL in generation mode.

    The model runs where it is (bring it to the device first when offloading).
    """
    from transformers import GenerationConfig  # start-up: transformers (~1 s) only once a rewrite runs

    check_rewrite_options(max_new_tokens, temperature, seed, top_p)
    model, tokenizer = encoder.model, encoder.tokenizer
    text = rewrite_chat(encoder, instruction, prompt)
    pil = encoder.prepare_images(image)[0]  # one instruction comes out, so one image goes in
    enc = encoder.inputs([pil], instruction, text=text)
    device = next(model.parameters()).device
    kwargs = {k: v.to(device) for k, v in enc.items() if torch.is_tensor(v)}
    kwargs["pixel_values"] = kwargs["pixel_values"].to(next(model.parameters()).dtype)
    stop = _stop_token_ids(tokenizer)
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=float(temperature) if sample else 1.0,
        top_p=float(top_p) if sample else 1.0,
        top_k=0 if sample else 50,  # no top-k cut: top_p is the only truncation
        repetition_penalty=float(repetition_penalty),
        num_beams=1,
        eos_token_id=stop,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0],
        use_cache=True,
    )
    encoder.reset_positions()  # deltas left by an earlier call would shift the mRoPE positions
    try:
        if sample:
            # A private RNG stream: the same seed gives the same text, and the caller's RNG is untouched.
            devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = model.generate(**kwargs, generation_config=config)
        else:
            out = model.generate(**kwargs, generation_config=config)
    finally:
        encoder.reset_positions()  # and these would shift the next encode()
    new = out[0, kwargs["input_ids"].shape[1]:]  # only the generated tokens
    finished = bool(new.numel()) and int(new[-1]) in stop
    truncated = not finished and new.numel() >= max_new_tokens
    return tokenizer.decode(new, skip_special_tokens=True).strip(), truncated


def rewrite_instruction(
    encoder,
    image: ImageLike,
    instruction: str,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    seed: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    prompt: str = REWRITE_PROMPT,
) -> RewriteResult:
    """Rewrite ``instruction`` for ``image`` with the loaded Qwen2.5-VL (``QwenVLEncoder``).

    The model answers the Input / Edit / Output fields; the Edit field becomes the new
    instruction. ``temperature`` 0 is greedy (deterministic); above 0 samples with ``top_p`` from
    a stream seeded by ``seed`` (same seed, same text). A batch of images uses its first image.
    When the answer has no usable Edit field (or was cut at ``max_new_tokens`` inside it), the
    original instruction is kept, ``fell_back`` is True and ``reason`` says why (also logged).
    """
    check_instruction(instruction)
    raw, truncated = generate_rewrite(
        encoder, image, instruction, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        top_p=top_p, repetition_penalty=repetition_penalty, prompt=prompt,
    )
    fields, reason = _parse(raw)
    if fields is not None and truncated and fields["output"] is None:
        # The answer stopped inside the Edit field (Output never came): the edit may be cut mid-sentence.
        reason = f"the answer was cut at max_new_tokens={max_new_tokens} before the Edit field ended; raise max_new_tokens"
        fields = None
    if fields is None:
        logger.warning("instruction rewriting kept the original instruction: %s", reason)
        return RewriteResult(
            instruction=instruction, original=instruction, input=None, edit=None, output=None, raw=raw,
            fell_back=True, reason=reason, truncated=truncated,
        )
    logger.info("rewrote instruction %r -> %r", instruction, fields["edit"])
    return RewriteResult(
        instruction=fields["edit"], original=instruction, input=fields["input"], edit=fields["edit"],
        output=fields["output"], raw=raw, fell_back=False, reason=None, truncated=truncated,
    )
