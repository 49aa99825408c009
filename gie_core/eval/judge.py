"""A local, offline judge: a Qwen2.5-VL chosen by path, this project's judging prompts, and a
robust parser of the answers.

Rubrics (one row each in :data:`RUBRICS`; the prompts are written for this project):

- ``viescore`` (GEdit-Bench, and your own sets): VIEScore-style. Semantic consistency asks about
  the source and the edit (``editing_success``, ``over_editing``, 0-10) and its score is the
  smaller of the two; perceptual quality asks about the edit alone (``naturalness``,
  ``artifacts``, 0-10), the smaller again; overall = sqrt(semantics x quality).
- ``imgedit`` (ImgEdit-Bench): three criteria from 1 to 5 that depend on the edit type (add,
  remove, replace, alter, background, style, extract, compose, action); the sample's score is
  their mean.
- ``complex-edit``: instruction following and identity preservation (source and edit), perceptual
  quality (edit alone), 0-10; overall = their mean.
- ``omnicontext``: prompt following and subject consistency against the reference image, 0-10;
  overall = sqrt(PF x SC).

The judge answers a JSON object; :func:`parse_scores` also reads JSON in code fences, single
quotes, trailing commas, "7/10", labelled lines ("**Editing success:** 7", "editing_success
(0-10): 7"), VIEScore's ``"score": [a, b]`` and its bare ``[a, b]`` (one number per criterion), and
for a one-criterion question ``{"score": 7}`` or ``Score: 4``. A number out of range counts as missing. An answer with every score is
``ok``, with some ``partial``, with none ``unparseable``; the raw answer is always kept.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from gie_core.engine.conversation import render_qwen_prompt
from gie_core.engine.rewrite import MAX_NEW_TOKENS_LIMIT
from gie_core.eval.runs import sample_seed
from gie_core.weights.parts import check_load, load_part

JUDGE_SYSTEM = (
    "You are a careful, strict and consistent judge of edited images. You look closely at every image "
    "you are given, score exactly what you are asked about on the scale given, and answer only with "
    "the JSON object asked for."
)

DEFAULT_JUDGE_MAX_NEW_TOKENS = 384
DEFAULT_JUDGE_MAX_PIXELS = 768 * 768
# Repeated judge samples, as Complex-Edit's eval.py takes them: -n 20 answers per question, asked -m 5
# at a time, at the OpenAI default temperature 1.0 (its completion_retry); each criterion is the
# mean over the answers, and a sample's overall the mean of those means.
COMPLEX_EDIT_SAMPLES = 20
JUDGE_SAMPLES_PER_CALL = 5
JUDGE_SAMPLE_TEMPERATURE = 1.0
MAX_JUDGE_SAMPLES = 100


@dataclass(frozen=True)
class Criterion:
    name: str  # the JSON key of its score
    text: str  # what it measures, as the judge reads it


@dataclass(frozen=True)
class Question:
    """One call to the judge: which images it sees (in order), what it scores, on which scale."""

    name: str
    images: tuple[str, ...]  # "source" (Image 1), "sources" (every input image) and/or "output", in the order shown
    criteria: tuple[Criterion, ...]
    low: int
    high: int
    intro: str  # says what the images are; holds {instruction}

    def prompt(self, instruction: str) -> str:
        """The question's text, the instruction in place (a plain replace: it may hold braces)."""
        lines = [self.intro.replace("{instruction}", instruction.strip()), ""]
        lines.append(f"Score each criterion with an integer from {self.low} (worst) to {self.high} (best):")
        lines += [f"- {c.name}: {c.text}" for c in self.criteria]
        fields = ", ".join(f'"{c.name}": <integer {self.low}-{self.high}>' for c in self.criteria)
        lines += [
            "",
            "Answer with one JSON object and nothing else, in this form:",
            '{"reasoning": "<one or two short sentences>", ' + fields + "}",
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Rubric:
    """How one benchmark is judged: its questions for a sample and how the answers combine."""

    name: str
    title: str
    metrics: tuple[str, ...]  # the per-sample metrics reported, the headline ("overall") last
    questions: Callable[[object], tuple[Question, ...]]  # (sample) -> questions
    combine: Callable[[dict], dict]  # criterion values (None = missing) -> metric values
    # answers per question that the benchmark's own scorer averages (Complex-Edit's eval.py: -n 20,
    # sampled at temperature 1); 1 = one greedy answer
    samples: int = 1


def _geo(a, b):
    return None if a is None or b is None else math.sqrt(max(a, 0.0) * max(b, 0.0))


def _min(*v):
    return None if any(x is None for x in v) else min(v)


def _mean(*v):
    return None if not v or any(x is None for x in v) else sum(v) / len(v)


# --- viescore (GEdit) ----------------------------------------------------------------------

_EDIT_INTRO = (
    'The first image is the original. The second image is the result of editing it with this instruction:\n"{instruction}"'
)
_OUTPUT_INTRO = (
    "This image was made by an image-editing model. Judge it only as a picture: how natural and clean it looks, "
    "not whether it matches any instruction."
)

VIESCORE_SC = Question(
    "semantics", ("source", "output"),
    (
        Criterion("editing_success", "how completely and correctly the second image carries out the instruction "
                                     "(0 = not at all, 10 = exactly as asked)"),
        Criterion("over_editing", "how well everything the instruction does not mention stays as in the original "
                                  "(0 = changed beyond recognition, 10 = nothing else changed)"),
    ),
    0, 10, _EDIT_INTRO,
)
VIESCORE_PQ = Question(
    "quality", ("output",),
    (
        Criterion("naturalness", "whether lighting, shadows, perspective, proportions and textures are plausible "
                                 "(0 = clearly unnatural, 10 = fully natural)"),
        Criterion("artifacts", "how free the image is of distortions, blur, noise, broken or duplicated parts and "
                               "odd marks (0 = heavy artifacts, 10 = none)"),
    ),
    0, 10, _OUTPUT_INTRO,
)


def _viescore_combine(v: dict) -> dict:
    semantics = _min(v.get("editing_success"), v.get("over_editing"))
    quality = _min(v.get("naturalness"), v.get("artifacts"))
    return {"semantics": semantics, "quality": quality, "overall": _geo(semantics, quality)}


# --- imgedit -------------------------------------------------------------------------------

_IMGEDIT_CRITERIA = {
    "instruction_compliance": "how exactly the requested change is made: the right object, place, amount and kind",
    "visual_naturalness": "whether the changed part blends in: lighting, scale, perspective and shadows agree with the scene",
    "visual_seamlessness": "whether the change is seamless: no halos, seams, colour bleeding or pasted look",
    "detail_coherence": "whether the new content is physically plausible and detailed, and the rest of the image is untouched",
    "detail_integrity": "whether the area left behind is filled plausibly, with no ghost, smear or leftover part",
    "detail_fidelity": "whether the changed attribute looks real (material, texture, colour) and the object keeps its shape",
    "foreground_preservation": "whether the main subject stays exactly as it was, with clean edges against the new background",
    "style_fidelity": "how clearly the asked-for style shows: its palette, strokes and textures",
    "content_preservation": "whether the layout, objects and identities of the original are kept under the new style",
    "rendering_quality": "how clean and coherent the stylised image is, free of artifacts",
    "object_identity": "whether the extracted object is the one asked for, complete and unchanged",
    "mask_precision": "how cleanly the object is cut out: sharp, accurate edges and nothing else kept",
    "visual_quality": "how clean the result is, free of blur, noise and artifacts",
    "identity_preservation": "whether the person or object keeps its identity, clothing and surroundings",
    "detail_preservation": "whether everything the instruction does not mention is kept as in the original",
}
_IMGEDIT_TYPES = {
    "add": ("instruction_compliance", "visual_naturalness", "detail_coherence"),
    "remove": ("instruction_compliance", "visual_naturalness", "detail_integrity"),
    "replace": ("instruction_compliance", "visual_naturalness", "detail_coherence"),
    "alter": ("instruction_compliance", "visual_seamlessness", "detail_fidelity"),
    "adjust": ("instruction_compliance", "visual_seamlessness", "detail_fidelity"),
    "background": ("instruction_compliance", "visual_seamlessness", "foreground_preservation"),
    "style": ("style_fidelity", "content_preservation", "rendering_quality"),
    "extract": ("object_identity", "mask_precision", "visual_quality"),
    "compose": ("instruction_compliance", "visual_naturalness", "detail_coherence"),
    "action": ("instruction_compliance", "identity_preservation", "visual_naturalness"),
}
_IMGEDIT_DEFAULT = ("instruction_compliance", "visual_quality", "detail_preservation")


def imgedit_question(edit_type: str) -> Question:
    """The ImgEdit question for one edit type (1-5 on three criteria that fit the type)."""
    names = _IMGEDIT_TYPES.get(edit_type, _IMGEDIT_DEFAULT)
    label = f"an '{edit_type}' edit" if edit_type in _IMGEDIT_TYPES else "an edit"
    intro = (
        f"The first image is the original. The second image is the result of {label} with this instruction:\n"
        '"{instruction}"'
    )
    return Question(f"imgedit-{edit_type}", ("source", "output"),
                    tuple(Criterion(n, _IMGEDIT_CRITERIA[n]) for n in names), 1, 5, intro)


def _imgedit_questions(sample) -> tuple[Question, ...]:
    return (imgedit_question(sample.category),)


def _imgedit_combine(v: dict) -> dict:
    return {"overall": _mean(*v.values()) if v else None}


# --- complex-edit --------------------------------------------------------------------------

COMPLEX_ALIGNMENT = Question(
    "alignment", ("source", "output"),
    (
        Criterion("instruction_following", "how many of the requested changes are made, and made correctly "
                                           "(0 = none, 10 = every one)"),
        Criterion("identity_preservation", "whether everything not asked to change keeps its identity, layout and "
                                           "details (0 = unrecognisable, 10 = perfectly kept)"),
    ),
    0, 10, _EDIT_INTRO,
)
COMPLEX_QUALITY = Question(
    "quality", ("output",),
    (Criterion("perceptual_quality", "how natural, coherent and free of artifacts the image is (0 = broken, 10 = flawless)"),),
    0, 10, _OUTPUT_INTRO,
)


def _complex_combine(v: dict) -> dict:
    a, b, c = v.get("instruction_following"), v.get("identity_preservation"), v.get("perceptual_quality")
    return {"instruction_following": a, "identity_preservation": b, "perceptual_quality": c, "overall": _mean(a, b, c)}


# --- omnicontext ---------------------------------------------------------------------------

_SUBJECT_INTRO = (
    "The first image shows a subject (a character or an object). The second image was generated from it with this "
    'prompt:\n"{instruction}"'
)
OMNI_PF = Question(
    "prompt_following", ("source", "output"),
    (Criterion("prompt_following", "how fully the second image shows the scene, action and details the prompt asks for "
                                   "(0 = unrelated, 10 = everything asked for)"),),
    0, 10, _SUBJECT_INTRO,
)
OMNI_SC = Question(
    "subject_consistency", ("source", "output"),
    (Criterion("subject_consistency", "whether the subject of the first image is the same one in the second: face or "
                                      "shape, clothing, colours, textures and markings (0 = a different subject, "
                                      "10 = clearly the same)"),),
    0, 10, _SUBJECT_INTRO,
)


# OmniContext's MULTIPLE and SCENE tasks: the judge sees every input image, then the output.
_SUBJECTS_INTRO = (
    "The first images show the subjects (characters, objects or a scene) given as input. The last image was "
    'generated from all of them with this prompt:\n"{instruction}"'
)
OMNI_PF_MULTI = Question(
    "prompt_following", ("sources", "output"),
    (Criterion("prompt_following", "how fully the last image shows the scene, action and details the prompt asks for, "
                                   "with the input subjects together (0 = unrelated, 10 = everything asked for)"),),
    0, 10, _SUBJECTS_INTRO,
)
OMNI_SC_MULTI = Question(
    "subject_consistency", ("sources", "output"),
    (Criterion("subject_consistency", "whether every subject of the input images is the same one in the last image: "
                                      "face or shape, clothing, colours, textures and markings (0 = different or "
                                      "missing subjects, 10 = each clearly the same)"),),
    0, 10, _SUBJECTS_INTRO,
)


def _omni_questions(sample) -> tuple[Question, ...]:
    """One input image: the subject question pair; several: the same questions over all of them."""
    return (OMNI_PF_MULTI, OMNI_SC_MULTI) if getattr(sample, "more_images", ()) else (OMNI_PF, OMNI_SC)


def _omni_combine(v: dict) -> dict:
    pf, sc = v.get("prompt_following"), v.get("subject_consistency")
    return {"prompt_following": pf, "subject_consistency": sc, "overall": _geo(pf, sc)}


RUBRICS: dict[str, Rubric] = {
    r.name: r
    for r in (
        Rubric("viescore", "VIEScore-style semantics / quality / overall, 0-10", ("semantics", "quality", "overall"),
               lambda s: (VIESCORE_SC, VIESCORE_PQ), _viescore_combine),
        Rubric("imgedit", "ImgEdit 1-5 rubric per edit type", ("overall",), _imgedit_questions, _imgedit_combine),
        Rubric("complex-edit", "Complex-Edit alignment and quality, 0-10",
               ("instruction_following", "identity_preservation", "perceptual_quality", "overall"),
               lambda s: (COMPLEX_ALIGNMENT, COMPLEX_QUALITY), _complex_combine, samples=COMPLEX_EDIT_SAMPLES),
        Rubric("omnicontext", "OmniContext prompt following / subject consistency, 0-10",
               ("prompt_following", "subject_consistency", "overall"), _omni_questions, _omni_combine),
    )
}


def rubric(name: str) -> Rubric:
    try:
        return RUBRICS[name]
    except KeyError:
        raise ValueError(f"rubric '{name}' is unknown; expected one of {', '.join(RUBRICS)}") from None


# --------------------------------------------------------------------------------------------
# Parsing answers
# --------------------------------------------------------------------------------------------


@dataclass
class ParsedAnswer:
    values: dict  # criterion -> float, or None when missing
    status: str  # ok | partial | unparseable
    problems: list = field(default_factory=list)


_NUMBER = re.compile(r"^\s*[\"'`*]*\s*(-?\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*(\d+))?")


def _norm(key) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(key).lower()).strip("_")


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        m = _NUMBER.match(value)
        if m:
            return float(m.group(1))
    return None


def _balanced_objects(text: str) -> list[str]:
    """Every top-level ``{...}`` span in the text (braces inside strings are skipped)."""
    spans, depth, start, quote, escape = [], 0, None, None, False
    for i, ch in enumerate(text):
        if quote:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == quote:
                quote = None
            continue
        if ch == '"' and depth:
            quote = ch
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
    return spans


def _json_dicts(text: str) -> list[dict]:
    out = []
    for span in _balanced_objects(text):
        for candidate in (span, re.sub(r",\s*([}\]])", r"\1", span.replace("'", '"'))):
            try:
                obj = json.loads(candidate)
            except (json.JSONDecodeError, ValueError):
                continue
            if isinstance(obj, dict):
                out.append(obj)
                out += [v for v in obj.values() if isinstance(v, dict)]  # {"scores": {...}}
                break
    return out


def _label_pattern(name: str) -> re.Pattern:
    """``editing_success: 7``, ``**Editing success:** 7``, ``over_editing is 6``, ``Score = 4``, and a scale
    between the label and its number: ``editing_success (0-10): 7``."""
    words = r"[\s_\-]*".join(re.escape(w) for w in name.split("_"))
    return re.compile(
        rf"(?i)(?<![a-z]){words}(?:[\s_\-]*score)?(?:\s*[(\[][^()\[\]\n]{{0,24}}[)\]])?"
        rf"[\"'`*\s]*(?:[:=]|\bis\b|-|\uff1a)\s*[\"'`*\s]*(-?\d+(?:\.\d+)?)"
    )


# a line that is only a list of numbers ("[8, 9]", "`[8, 9]`"): a list inside a sentence ("the scale [0, 10]") is not one
_BARE_LIST = re.compile(r"(?m)^[\s`*]*\[\s*(-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?)*)\s*\][\s`*.]*$")


def answer_reasoning(text: str) -> str | None:
    """The ``reasoning`` the judge gave in its answer's JSON, or None."""
    return next((str(d["reasoning"]) for d in _json_dicts(text) if d.get("reasoning")), None)


def _from_json(text: str, names: list[str]) -> dict:
    """Scores from the answer's JSON objects: a key per criterion, VIEScore's ``"score": [a, b]``, and
    ``{"score": 7}`` when only one criterion is asked."""
    found: dict = {}
    for obj in _json_dicts(text):
        positional = None
        for key, value in obj.items():
            k = _norm(key)
            for n in names:
                if k == n or k.replace("_", "") == n.replace("_", "") or k == f"{n}_score":
                    num = _number(value)
                    if num is not None:
                        found[n] = num
            if k in ("score", "scores"):
                positional = value if isinstance(value, list) else [value] if len(names) == 1 else None
        if positional is not None and not any(n in found for n in names) and len(positional) >= len(names):
            for n, value in zip(names, positional):  # VIEScore's {"score": [a, b], "reasoning": ...}
                num = _number(value)
                if num is not None:
                    found[n] = num
    return found


def _from_text(text: str, names: list[str], found: dict) -> dict:
    """Scores the JSON did not give, from labelled lines (the last one: a model may restate the scale
    first), a lone ``Score: 4`` when one criterion is asked, or a bare list ``[8, 9]`` of exactly one
    number per criterion, alone on its line (as VIEScore's own parser reads it)."""
    found = dict(found)
    for n in names:
        if n not in found:
            matches = _label_pattern(n).findall(text)
            if matches:
                found[n] = float(matches[-1])
    if len(names) == 1 and names[0] not in found:
        matches = _label_pattern("score").findall(text)
        if matches:
            found[names[0]] = float(matches[-1])
    if not any(n in found for n in names):
        lists = [m.group(1) for m in _BARE_LIST.finditer(text)]
        lists = [[float(v) for v in m.split(",")] for m in lists]
        lists = [v for v in lists if len(v) == len(names)]
        if lists:
            found.update(zip(names, lists[-1]))
    return found


def parse_scores(text: str, criteria, low: float, high: float) -> ParsedAnswer:
    """Read the scores ``criteria`` (names) from a judge's answer; see the module docstring."""
    names = [c.name if isinstance(c, Criterion) else str(c) for c in criteria]
    values: dict = {n: None for n in names}
    problems: list[str] = []
    if not isinstance(text, str) or not text.strip():
        return ParsedAnswer(values, "unparseable", ["the answer is empty"])
    found = _from_text(text, names, _from_json(text, names))
    for n in names:
        if n not in found:
            continue
        v = found[n]
        if low <= v <= high:
            values[n] = v
        else:
            problems.append(f"{n}={v:g} is outside {low:g}-{high:g}")
    got = sum(v is not None for v in values.values())
    missing = [n for n, v in values.items() if v is None and not any(p.startswith(f"{n}=") for p in problems)]
    if missing:
        problems.append("no score for " + ", ".join(missing))
    status = "ok" if got == len(names) else ("partial" if got else "unparseable")
    return ParsedAnswer(values, status, problems)


# --------------------------------------------------------------------------------------------
# The Qwen2.5-VL judge
# --------------------------------------------------------------------------------------------


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """``image`` scaled down (aspect kept) to at most ``max_pixels``; never scaled up."""
    w, h = image.size
    if w * h <= max_pixels:
        return image
    s = math.sqrt(max_pixels / (w * h))
    return image.resize((max(28, round(w * s)), max(28, round(h * s))), Image.BICUBIC)


class QwenJudge:
    """Asks a loaded Qwen2.5-VL (a :class:`gie_core.engine.encoders.QwenVLEncoder`) about several images at
    once, greedily (the same images and question always give the same answer)."""

    def __init__(self, encoder, *, max_new_tokens: int = DEFAULT_JUDGE_MAX_NEW_TOKENS,
                 max_pixels: int = DEFAULT_JUDGE_MAX_PIXELS, name: str = ""):
        check_judge_options(max_new_tokens, max_pixels)
        self.encoder, self.max_new_tokens, self.max_pixels, self.name = encoder, int(max_new_tokens), int(max_pixels), name
        model = encoder.model
        base = model.model if hasattr(model, "model") else model
        self._passes_token_types = "mm_token_type_ids" in inspect.signature(base.forward).parameters

    def chat(self, n_images: int, prompt: str) -> str:
        """The chat text: the judge's system block, then the images first and the question."""
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]
        return render_qwen_prompt(messages)  # never the tokenizer folder's template (it may be text-only)

    def inputs(self, images: list[Image.Image], prompt: str) -> dict:
        """Model inputs for several images in one prompt (each image's pad expanded to its token count)."""
        enc_ = self.encoder
        pils = [fit_pixels(im.convert("RGB"), self.max_pixels) for im in images]
        vision = enc_.image_processor(images=pils, return_tensors="pt")
        grid = vision["image_grid_thw"]  # [N, 3]
        counts = (grid.prod(-1) // enc_.merge_size**2).tolist()
        pad = enc_.tokenizer.convert_ids_to_tokens(enc_.image_token_id)
        pieces = self.chat(len(pils), prompt).split(pad)
        if len(pieces) != len(pils) + 1:
            raise RuntimeError(f"the judge's chat template placed {len(pieces) - 1} image slots for {len(pils)} images")
        text = pieces[0] + "".join(pad * n + piece for n, piece in zip(counts, pieces[1:]))
        enc = dict(enc_.tokenizer([text], return_tensors="pt"))
        enc["pixel_values"], enc["image_grid_thw"] = vision["pixel_values"], grid
        if self._passes_token_types:  # transformers 5 needs it for the mRoPE positions
            enc["mm_token_type_ids"] = (enc["input_ids"] == enc_.image_token_id).to(torch.int32)
        return enc

    def _stop_ids(self) -> list[int]:
        tok = self.encoder.tokenizer
        ids = []
        for t in ("<|im_end|>", "<|endoftext|>"):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tok.unk_token_id:
                ids.append(i)
        return ids or [tok.eos_token_id]

    @torch.no_grad()
    def answer(self, images: list[Image.Image], prompt: str) -> str:
        """The judge's answer (generated tokens only, special tokens removed)."""
        from transformers import GenerationConfig  # start-up: transformers only once a judge answers

        model = self.encoder.model
        param = next(model.parameters())
        enc = self.inputs(images, prompt)
        kwargs = {k: v.to(param.device) for k, v in enc.items() if torch.is_tensor(v)}
        kwargs["pixel_values"] = kwargs["pixel_values"].to(param.dtype)
        stop = self._stop_ids()
        tok = self.encoder.tokenizer
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop[0], use_cache=True,
        )
        self.encoder.reset_positions()  # stale mRoPE deltas would shift the positions
        try:
            out = model.generate(**kwargs, generation_config=config)
        finally:
            self.encoder.reset_positions()
        return tok.decode(out[0, kwargs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


    @torch.no_grad()
    def answer_samples(self, images: list[Image.Image], prompt: str, n: int, seed: int) -> list[str]:
        """``n`` sampled answers (temperature :data:`JUDGE_SAMPLE_TEMPERATURE`, up to
        :data:`JUDGE_SAMPLES_PER_CALL` per generate call, as Complex-Edit asks its judge), the same
        for the same ``seed``: the global RNG is forked, seeded and restored around each call."""
        from transformers import GenerationConfig  # start-up: transformers only once a judge answers

        model = self.encoder.model
        param = next(model.parameters())
        enc = self.inputs(images, prompt)
        kwargs = {k: v.to(param.device) for k, v in enc.items() if torch.is_tensor(v)}
        kwargs["pixel_values"] = kwargs["pixel_values"].to(param.dtype)
        stop, tok = self._stop_ids(), self.encoder.tokenizer
        devices = [param.device] if param.device.type == "cuda" else []
        out: list[str] = []
        for call, start in enumerate(range(0, n, JUDGE_SAMPLES_PER_CALL)):
            count = min(JUDGE_SAMPLES_PER_CALL, n - start)
            config = GenerationConfig(
                max_new_tokens=self.max_new_tokens, do_sample=True, temperature=JUDGE_SAMPLE_TEMPERATURE, top_p=1.0,
                top_k=0, num_return_sequences=count, eos_token_id=stop,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop[0], use_cache=True,
            )
            self.encoder.reset_positions()
            try:
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed((int(seed) + call) % 2**63)
                    seqs = model.generate(**kwargs, generation_config=config)
            finally:
                self.encoder.reset_positions()
            out += [tok.decode(row[kwargs["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in seqs]
        return out


def check_judge_samples(n: int) -> int:
    """The number of judge answers per question (checked before any weight is read)."""
    if not 1 <= int(n) <= MAX_JUDGE_SAMPLES:
        raise ValueError(f"judge samples is {n} but must be 1-{MAX_JUDGE_SAMPLES}")
    return int(n)


def check_judge_options(max_new_tokens: int, max_pixels: int) -> None:
    """The judge's answer length and image size bounds, checked before any weight is read."""
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"judge max new tokens is {max_new_tokens} but must be 1-{MAX_NEW_TOKENS_LIMIT}")
    if int(max_pixels) < 28 * 28:
        raise ValueError(f"judge max pixels is {max_pixels} but must be at least {28 * 28}")


def check_judge(path: str | os.PathLike) -> Path:
    """Check a judge folder before any weight is read: a folder with config.json of a GPT-Image-Edit
    checkpoint or a Qwen2.5-VL, its weights in safetensors (``.bin``-only folders are refused)."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"judge '{p}' must be a folder: a GPT-Image-Edit checkpoint or a Qwen2.5-VL model folder")
    if not (p / "config.json").is_file():
        raise ValueError(f"judge '{p}' has no config.json; give a GPT-Image-Edit checkpoint or a Qwen2.5-VL model folder")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"judge '{p}/config.json' is not valid JSON: {exc.msg}") from None
    if "denoise_tower" not in cfg and "qwen2_5_vl" not in str(cfg.get("model_type", "")):
        raise ValueError(f"judge '{p}' is a '{cfg.get('model_type')}' model, not Qwen2.5-VL")
    check_load("qwen", p)  # the layout, and safetensors weights only
    return p


def load_judge(path: str | os.PathLike, *, dtype="bf16", device="cpu", **options) -> QwenJudge:
    """The judge from ``path``: a GPT-Image-Edit checkpoint folder (its Qwen2.5-VL-7B, with the
    generation head) or a stock Qwen2.5-VL folder (7B, 32B, 72B...), local files only
    (checked by :func:`check_judge` first)."""
    p = check_judge(path)
    encoder = load_part("qwen", p, dtype=dtype, device=device).module  # the checkpoint's Qwen, or a stock folder
    return QwenJudge(encoder, name=str(p), **options)


# --------------------------------------------------------------------------------------------
# Judging one sample
# --------------------------------------------------------------------------------------------


def _ask(judge, images, prompt: str, n: int, seed: int) -> list[str]:
    """``n`` answers: one greedy ``answer``, or ``answer_samples`` (a judge without it is asked ``n`` times)."""
    if n == 1:
        return [judge.answer(images, prompt)]
    if hasattr(judge, "answer_samples"):
        return list(judge.answer_samples(images, prompt, n, seed))
    return [judge.answer(images, prompt) for _ in range(n)]


def _mean_runs(runs: list[ParsedAnswer], names: list[str]) -> dict:
    """Per criterion the mean over the answers that gave it (Complex-Edit's ``dict_mean`` over its
    runs); None where no answer did."""
    out = {}
    for n in names:
        got = [r.values[n] for r in runs if r.values.get(n) is not None]
        out[n] = sum(got) / len(got) if got else None
    return out


def _status(statuses: list[str]) -> str:
    if all(s == "ok" for s in statuses):
        return "ok"
    if all(s == "unparseable" for s in statuses):
        return "unparseable"
    return "partial"


def judge_sample(judge, rub: Rubric, sample, source: Image.Image, output: Image.Image, *, samples: int = 1,
                 seed: int = 0, more_sources: Sequence[Image.Image] = ()) -> dict:
    """Ask every question of ``rub`` about one sample: answers (raw and parsed), status, metrics.

    ``judge`` is anything with ``answer(images, prompt) -> str`` (:class:`QwenJudge`). With
    ``samples`` > 1 each question is answered that many times (sampled, seeded by ``seed``, the
    sample's key and the question) and each criterion is the mean over the answers that gave it,
    as Complex-Edit aggregates its repeated judge samples; ``raw`` is then the list of answers.
    ``more_sources``: the sample's further input images (Image 2 ...), shown with Image 1 to the
    questions that ask about every input (OmniContext's multi-image tasks).
    """
    answers, values, statuses = {}, {}, []
    pictures = {"source": [source], "sources": [source, *more_sources], "output": [output]}
    for q in rub.questions(sample):
        shown = [im for n in q.images for im in pictures[n]]
        raws = _ask(judge, shown, q.prompt(sample.instruction), samples,
                    sample_seed(seed, f"{sample.key}/{q.name}"))
        runs = [parse_scores(raw, q.criteria, q.low, q.high) for raw in raws]
        names = [c.name for c in q.criteria]
        status = _status([r.status for r in runs])
        if samples == 1:
            answers[q.name] = {"raw": raws[0], "values": runs[0].values, "status": status, "problems": runs[0].problems}
        else:
            answers[q.name] = {"raw": raws, "values": _mean_runs(runs, names), "status": status,
                               "runs": [r.values for r in runs], "problems": sorted({p for r in runs for p in r.problems})}
        values.update(answers[q.name]["values"])
        statuses.append(status)
    return {"status": _status(statuses), "answers": answers, "metrics": rub.combine(values)}
