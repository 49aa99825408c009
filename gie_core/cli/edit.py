"""``gie-edit``: edit one image by an instruction (or a list of jobs) from the command line.

As the reference app: ``gie-edit a.png b.png "put the hat from the second image on the dog"``
takes an optional second image; ``--conversation chat.json`` continues a saved conversation (the
turn and its reply are appended atomically once made); ``--answer`` (or ``gie-ask``) prints a
text answer instead of editing; ``--route auto`` lets the checkpoint's task head decide.

With no weights given it runs a demo: a tiny random model set in the real on-disk layouts is
built once into the user's cache and the whole pipeline runs on a bundled sample image.

``--jobs LIST -o FOLDER`` runs many edits on one load (see :mod:`gie_core.engine.jobs`): each job is
encoded once for all its seeds, outputs are written atomically, and a rerun skips the outputs
that exist.

Every input is checked (by :func:`gie_core.engine.request.resolve_edit` and the shared CLI helpers)
before any weight is read.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gie_core.checks import check_float
from gie_core.cli.ask import answer_one, answer_plan, load_conversation
from gie_core.cli.common import (
    OUTPUT_SUFFIXES,
    device_and_dtype,
    load_input,
    output_paths,
    quiet_library_warnings,
    run_command,
    save_image,
)
from gie_core.cli.help import HelpFormatter
from gie_core.constants import (
    ANSWER_MAX_NEW_TOKENS,
    AUTO_DTYPE,
    DEFAULT_GUIDANCE,
    DEFAULT_REFERENCE_RESAMPLE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_TARGET_AREA,
    DEFAULT_TRUE_CFG,
    DTYPE_NAMES,
    GUIDANCE_RANGE,
    LOAD_DEFAULTS,
    LORA_STRENGTH_RANGE,
    MAX_IMAGES_PER_TURN,
    OFFLOAD_MODES,
    REFERENCE_RESAMPLE_MODES,
    REFERENCE_RESIZE_MODES,
    ROUTE_MODES,
    SEED_RANGE,
    STEPS_RANGE,
    TRUE_CFG_RANGE,
)
from gie_core.engine.acceleration import ATTENTION_TABLE, CACHE_TABLE, DEFAULT_ATTENTION, NO_CACHE
from gie_core.engine.conversation import Conversation
from gie_core.engine.encoders import check_instruction
from gie_core.engine.taskhead import check_route
from gie_core.engine.jobs import parse_seeds, plan_outputs, read_jobs, run_jobs
from gie_core.engine.modes import DEFAULT_FUSION_MODE, FUSION_MODES, STOCK_FUSION_MODE, fusion_mode
from gie_core.engine.pipeline import EditPipeline, plan_paths
from gie_core.engine.request import resolve_edit
from gie_core.engine.rewrite import DEFAULT_MAX_NEW_TOKENS, check_rewrite_options, rewrite_instruction
from gie_core.files import check_output_path
from gie_core.weights.quantize import NO_QUANTIZATION, STORAGE_TABLE, quantize_choices

DEMO_INSTRUCTION = "make the sky a warm sunset"
DEMO_AREA = 256 * 256  # the tiny models prove the pipeline; a small output keeps the demo quick


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gie-edit",
        description=(
            "Edit an image by an instruction with GPT-Image-Edit (Qwen2.5-VL + T5 fused into FLUX.1 Kontext [dev]). "
            "Weights are read from local paths only. With no weights given, runs a demo on tiny random models "
            "(built once into your cache) and a bundled sample image: it proves the pipeline, not the quality."
        ),
        formatter_class=HelpFormatter,
        epilog=(
            "examples:\n"
            "  gie-edit photo.jpg 'make it winter' -o out.png --model gpt-image-edit/final_checkpoint --kontext FLUX.1-Kontext-dev\n"
            "  gie-edit photo.jpg 'make it winter' -o out.png --mode t5 --transformer flux1-kontext-dev.safetensors \\\n"
            "      --vae ae.safetensors --t5 t5xxl_fp16.safetensors --clip clip_l.safetensors --tokenizers FLUX.1-Kontext-dev\n"
            "  gie-edit --jobs jobs.jsonl -o out/ --model ... --kontext ... --seeds 1,2,3   # many edits, one load\n"
            "  gie-edit photo.jpg 'make it winter' -o out.png --model ... --kontext ... --cache magcache --quantize-transformer fp8\n"
            "  gie-edit a.png b.png 'put the hat from the second image on the dog' -o out.png --model ... --kontext ...\n"
            "  gie-edit a.png 'make it winter' -o 1.png --conversation chat.json --model ... --kontext ...\n"
            "  gie-edit 'now add snow on the roof' -o 2.png --conversation chat.json --model ... --kontext ...\n"
            "  gie-edit --answer image.png 'what does the sign say?' --model ...   # prints the answer (as gie-ask)\n"
            "  gie-edit -o demo.png            # demo on tiny random models\n"
        ),
        allow_abbrev=False,
    )
    p.add_argument("inputs", nargs="*", metavar="[IMAGE [IMAGE2]] INSTRUCTION",
                   help=f"the image to edit (PNG/JPEG/WebP...), an optional second image (the app's Image 2: at most "
                        f"{MAX_IMAGES_PER_TURN} a turn) and the instruction, e.g. 'replace the sky with a sunset'; with "
                        "--conversation the images may be left out (the conversation's are used); the demo uses a "
                        "bundled sample")
    p.add_argument("-o", "--output",
                   help="output PNG path (needed unless --answer); with --batch N, files OUTPUT_0.png ... are written; "
                        "with --jobs, the output folder")
    for add in (_weight_options, _editing_options, _conversation_options, _jobs_options, _speed_options,
                _rewrite_options, _runtime_options):
        add(p)
    return p


def _weight_options(p: argparse.ArgumentParser) -> None:
    """--model, --kontext and the single files."""
    w = p.add_argument_group("weights (local paths only)")
    w.add_argument("--model", help="GPT-Image-Edit checkpoint directory (the released final_checkpoint layout)")
    w.add_argument("--kontext", help="FLUX.1-Kontext-dev diffusers directory (VAE, CLIP, T5, tokenizers, scheduler, stock transformer)")
    w.add_argument("--transformer", help="single-file Kontext transformer: flux1-kontext-dev.safetensors (BFL layout, fp8 ok) "
                                         "or a GGUF file (.gguf: Q8_0/Q5/Q4 community files or gie-convert's), kept quantised")
    w.add_argument("--vae", help="single-file FLUX VAE (ae.safetensors)")
    w.add_argument("--t5", help="single-file T5-XXL encoder (t5xxl_fp16.safetensors or an fp8 one)")
    w.add_argument("--clip", help="single-file CLIP-L text encoder (clip_l.safetensors)")
    w.add_argument("--qwen", help="single-file Qwen2.5-VL (gie-convert's, or ComfyUI's qwen_2.5_vl_7b*.safetensors; "
                                  "bf16/fp8/scaled fp8) instead of the checkpoint's; with --connector, no --model needed")
    w.add_argument("--qwen-tokenizer", help="folder with the Qwen tokenizer for --qwen (a Qwen2.5-VL folder, or ComfyUI's "
                                            "comfy/text_encoders/qwen25_tokenizer); default: --model")
    w.add_argument("--connector", help="connector safetensors (e.g. trained with gie-train) replacing the checkpoint's")
    w.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a FLUX/Kontext LoRA safetensors applied to the transformer, strength 1 unless given; repeatable")
    w.add_argument("--tokenizers", help="folder with tokenizer/ (CLIP) and tokenizer_2/ (T5), for single-file text encoders")


def _editing_options(p: argparse.ArgumentParser) -> None:
    """The edit's own values (steps, guidance, seed, size, snapping, true CFG, the reference)."""
    s = p.add_argument_group("editing")
    s.add_argument("--mode", choices=FUSION_MODES, help="conditioning: vlm+t5 (released model, default with --model), vlm, t5 (stock Kontext, default without --model), or the training modes")
    s.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"sampling steps, {STEPS_RANGE[0]}..{STEPS_RANGE[1]} (default {DEFAULT_STEPS})")
    s.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"FLUX guidance embedding, {GUIDANCE_RANGE[0]:g}..{GUIDANCE_RANGE[1]:g} (default {DEFAULT_GUIDANCE})")
    s.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"noise seed, {SEED_RANGE[0]}..{SEED_RANGE[1]}; same seed, same image on any device (default {DEFAULT_SEED})")
    s.add_argument("--size", default="auto",
                   help="output WIDTHxHEIGHT in multiples of 16; a side 0 follows the input's aspect, so 0x0 (or 'auto') "
                        f"picks both (default: auto, ~1 MP at the input's aspect, or the padded aspect with --snap; "
                        f"~{DEMO_AREA // 1000 / 1000:g} MP in the demo)")
    s.add_argument("--batch", type=int, default=1, help="number of images to make (default 1)")
    s.add_argument("--snap", nargs="?", const="default", default=None, metavar="RATIOS",
                   help="pad the input to the nearest ratio (default set 1:1,3:2,2:3; also 'kontext' or a list like '1:1,4:3') "
                        "before editing and crop the padding from the result, back to the input's size")
    s.add_argument("--pad-color", default="white",
                   help="padding colour for --snap: white (default), black, edge, or r,g,b; transparent inputs are "
                        "composited on it too (on white without --snap or with edge)")
    s.add_argument("--negative", default=None, help="negative instruction for true CFG (used with --true-cfg > 1)")
    s.add_argument("--true-cfg", type=float, default=DEFAULT_TRUE_CFG,
                   help=f"true classifier-free guidance scale, {TRUE_CFG_RANGE[0]:g}..{TRUE_CFG_RANGE[1]:g}; 1 = off (default)")
    s.add_argument("--reference-size", choices=REFERENCE_RESIZE_MODES, default=None,
                   help="resize the input to the nearest preferred Kontext resolution (default, as the reference) "
                        "or keep its size (the demo's default, to stay quick)")
    s.add_argument("--reference-resample", choices=REFERENCE_RESAMPLE_MODES, default=DEFAULT_REFERENCE_RESAMPLE,
                   help="how the input is resized for the reference: lanczos (default, as diffusers) or nearest "
                        "(what upstream's evaluation did: use it to reproduce the published numbers)")


def _conversation_options(p: argparse.ArgumentParser) -> None:
    """Conversations, answers and the task head (the reference app)."""
    c = p.add_argument_group("conversations and answers (the reference app)")
    c.add_argument("--conversation", metavar="FILE",
                   help="a conversation file (JSON) to continue, made when missing: its turns and images condition "
                        "this edit, and this turn and its reply are appended to it once made (atomically: a failed or "
                        "killed run leaves the file as it was)")
    c.add_argument("--answer", action="store_true",
                   help="answer the instruction as a question about the image(s) with the checkpoint's Qwen2.5-VL and "
                        "print the text (as gie-ask; loads only the Qwen); same as --route answer")
    c.add_argument("--route", choices=ROUTE_MODES, default="edit",
                   help="edit (default), answer, or auto: the checkpoint's task head (task_head_final.pt / "
                        "task_head.safetensors) decides as the app does; without a head auto edits, with a note")
    c.add_argument("--task-head", metavar="FILE", help="task head file for --route auto (default: the --model folder's)")
    c.add_argument("--max-new-tokens", type=int, default=ANSWER_MAX_NEW_TOKENS,
                   help=f"bound on an answer's length (default {ANSWER_MAX_NEW_TOKENS}, the app's)")


def _jobs_options(p: argparse.ArgumentParser) -> None:
    """Many edits, one load."""
    j = p.add_argument_group("many edits, one load")
    j.add_argument("--jobs", metavar="LIST",
                   help="a job list: a .jsonl/.json file of {image, instruction[, image2, seed|seeds, name, negative]}, a .tsv/.txt "
                        "file of 'image<TAB>instruction[<TAB>seeds]' lines, or a folder of images each with a same-named .txt "
                        "instruction; -o is then the output folder (NAME_sSEED.png), and a rerun skips the outputs that exist")
    j.add_argument("--seeds", metavar="SEEDS",
                   help="seeds to make of every image: '1,2,3' or '0-3' (default: --seed); a job's own seeds win")


def _speed_options(p: argparse.ArgumentParser) -> None:
    """Step caches, attention, compile and lighter weights."""
    q = p.add_argument_group("speed and memory (see README: Speed and memory)")
    cache_help = "; ".join(f"{m.name}[:{m.value_name.upper()}] ({m.title}, default {m.default:g}, "
                           f"{m.low:g}..{m.high:g})" for m in CACHE_TABLE)
    q.add_argument("--cache", default=NO_CACHE, metavar="NAME[:VALUE]",
                   help=f"step caching through diffusers' cache hooks (default {NO_CACHE}): {cache_help}. Faster, "
                        "slightly different images")
    q.add_argument("--attention", default=DEFAULT_ATTENTION, choices=[a.name for a in ATTENTION_TABLE],
                   help=f"attention backend (diffusers' dispatcher; default {DEFAULT_ATTENTION}); one this machine cannot "
                        "run falls back to sdpa with a note")
    q.add_argument("--compile", action="store_true",
                   help="torch.compile the repeated transformer blocks (regional; the first edit compiles, later ones gain)")
    q.add_argument("--quantize-transformer", default=NO_QUANTIZATION, choices=quantize_choices("transformer"),
                   help="store the Kontext transformer lighter: fp8 = float8 storage, layers upcast while they run "
                        "(~0.5x the bytes of bf16); for GGUF pass a .gguf --transformer")
    q.add_argument("--quantize-qwen", default=NO_QUANTIZATION, choices=quantize_choices("qwen"),
                   help="store Qwen2.5-VL lighter: " + "; ".join(f"{n} = {STORAGE_TABLE[n].description}"
                                                                for n in quantize_choices("qwen") if n != NO_QUANTIZATION))


def _rewrite_options(p: argparse.ArgumentParser) -> None:
    """Instruction rewriting before the edit."""
    w2 = p.add_argument_group("instruction rewriting")
    w2.add_argument("--rewrite", action="store_true",
                    help="first rewrite the instruction into an explicit one with the checkpoint's Qwen2.5-VL (as gie-rewrite; "
                         "needs --model and a mode using the VLM); the rewrite is printed on stderr")
    w2.add_argument("--rewrite-max-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                    help=f"bound on the rewriting answer's length (default {DEFAULT_MAX_NEW_TOKENS})")


def _runtime_options(p: argparse.ArgumentParser) -> None:
    """dtype, offload, device, progress."""
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", choices=[AUTO_DTYPE, *DTYPE_NAMES], default=LOAD_DEFAULTS["cli"].dtype,
                   help="compute dtype of the weights (default bf16 on GPU, fp32 on CPU)")
    r.add_argument("--offload", choices=OFFLOAD_MODES, default=LOAD_DEFAULTS["cli"].offload,
                   help="none (all on the GPU), model (encoders leave the GPU before the transformer runs), "
                        "sequential (also stream transformer blocks: for 24 GB cards)")
    r.add_argument("--device", default=None, help="torch device (default: cuda if present, else mps, else cpu)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")



def parse_size(text: str) -> tuple[int, int]:
    """'auto' -> (0, 0); 'WIDTHxHEIGHT' -> (w, h), 0 for a side that follows the aspect.
    The sides themselves are checked by the request resolver."""
    if text.strip().lower() == "auto":
        return 0, 0
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size '{text}' must be WIDTHxHEIGHT (e.g. 1024x768) or 'auto'") from None
    if w < 0 or h < 0:
        raise ValueError(f"--size '{text}': sides must be positive multiples of 16 (or 0 to follow the aspect)")
    return w, h


def parse_lora(text: str) -> tuple[str, float]:
    """'file.safetensors' or 'file.safetensors:0.8' -> (path, strength), the strength finite and in range."""
    path, sep, strength = text.rpartition(":")
    if sep and path.endswith(".safetensors"):
        try:
            value = float(strength)
        except ValueError:
            raise ValueError(f"--lora '{text}': strength '{strength}' is not a number") from None
        return path, check_float(f"--lora '{text}': strength", value, *LORA_STRENGTH_RANGE)
    return text, 1.0


def rewrite_for_edit(pipe, image, instruction: str, max_new_tokens: int) -> str:
    """The rewritten instruction (greedy) from the pipeline's loaded Qwen2.5-VL, reported on stderr."""
    quiet_library_warnings()
    with pipe.on_device(pipe.qwen.model):
        result = rewrite_instruction(pipe.qwen, image, instruction, max_new_tokens=max_new_tokens)
    if result.fell_back:
        print(f"gie-edit: warning: --rewrite kept the original instruction: {result.reason}", file=sys.stderr)
    else:
        print(f"gie-edit: rewritten instruction: {result.instruction}", file=sys.stderr)
    return result.instruction


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # images and instruction may sit between options
    return run_command("gie-edit", lambda: run(args))


@dataclass(frozen=True)
class EditInputs:
    """What ``gie-edit`` was asked, checked before any image or weight is read: the edit's own
    inputs, the values :func:`edit_request` gives the resolver, and the loading options."""

    demo: bool  # no weights given: the tiny random models and the bundled sample
    input_path: str | None  # one edit (None with --jobs, or a conversation turn with no new image)
    instruction: str | None
    input2: str | None  # the app's Image 2
    conversation: Conversation | None  # the conversation to continue (loaded and checked)
    route: str  # ROUTE_MODES
    mode: str
    gie_dir: str | None
    kontext_dir: str | None
    reference_resize: str
    size: tuple[int, int]  # (width, height), 0 = auto / follow the aspect
    background: str  # what transparent inputs are composited on
    device: object  # torch.device
    dtype: str
    load: dict  # EditPipeline.from_paths' storage options (LoRAs, quantizations)


def run(args) -> int:
    """gie-edit's steps: check every input, resolve the request(s) (reading only the images),
    load the models once, edit, write."""
    inputs = check_inputs(args)
    if args.jobs is not None:
        return _edit_jobs(args, inputs)
    if inputs.route == "answer":
        return answer_one(args, inputs)
    if inputs.input2 is not None or inputs.conversation is not None or inputs.route == "auto":
        return _edit_turn(args, inputs)
    return _edit_one(args, inputs)


def check_inputs(args) -> EditInputs:
    """Every command-line input checked (combinations, paths, numbers, choices, device); nothing read."""
    demo = not any((args.model, args.kontext, args.transformer, args.vae, args.t5, args.clip, args.qwen))
    route = "answer" if args.answer else check_route(args.route)
    _check_combinations(args, route)
    conversation = load_conversation(args.conversation)
    paths, instruction = _input_and_instruction(args, demo, conversation is not None)
    gie_dir, kontext_dir = (None, None) if demo else (args.model, args.kontext)
    mode = args.mode or (DEFAULT_FUSION_MODE if (gie_dir or demo or args.qwen) else STOCK_FUSION_MODE)
    _check_weight_paths(args)
    device, dtype = device_and_dtype(args.device, args.dtype)
    size = parse_size(args.size)
    if route == "answer":  # only the Qwen loads: its choices are checked by answer_plan
        return EditInputs(demo=demo, input_path=paths[0], instruction=instruction, input2=paths[1],
                          conversation=conversation, route=route, mode=mode, gie_dir=gie_dir, kontext_dir=kontext_dir,
                          reference_resize="preferred", size=(0, 0), background="white", device=device, dtype=dtype,
                          load={"plan": answer_plan(args, demo, dtype, device)})
    return EditInputs(
        demo=demo, input_path=paths[0], instruction=instruction, input2=paths[1], conversation=conversation,
        route=route, mode=mode, gie_dir=gie_dir,
        kontext_dir=kontext_dir, reference_resize=args.reference_size or ("keep" if demo else "preferred"),
        size=size, background=args.pad_color if args.snap and args.pad_color != "edge" else "white",
        device=device, dtype=dtype, load=_check_loading(args, demo, gie_dir, kontext_dir, mode, dtype, device),
    )


def edit_request(args, inputs: EditInputs, image, seed: int, more_images=()):
    """The :class:`gie_core.engine.request.EditRequest` of these options for one input ``image``
    (PIL, or its (width, height)) and ``seed`` (``more_images``: the (width, height) of Image 2):
    the CLI's one call of the resolver."""
    width, height = inputs.size
    image_width, image_height = image if isinstance(image, tuple) else image.size
    return resolve_edit(
        image_width=image_width, image_height=image_height, more_images=more_images, mode=inputs.mode, steps=args.steps,
        guidance=args.guidance, seed=seed, width=width, height=height,
        area=DEMO_AREA if inputs.demo else DEFAULT_TARGET_AREA, batch_size=args.batch, true_cfg=args.true_cfg,
        snap=args.snap, pad_color=args.pad_color, reference_resize=inputs.reference_resize,
        reference_resample=args.reference_resample, cache=args.cache, attention=args.attention, compile=args.compile,
    )


def _check_combinations(args, route: str) -> None:
    if args.answer and args.route not in ("edit", "answer"):
        raise ValueError(f"--answer is --route answer; it contradicts --route {args.route}")
    if args.jobs is not None:
        if args.inputs:
            raise ValueError("give either INPUT and INSTRUCTION or --jobs, not both")
        if args.rewrite:
            raise ValueError("--rewrite works on one edit at a time; it is not available with --jobs")
        if args.conversation is not None or route != "edit":
            raise ValueError("--jobs makes plain edits; --conversation, --answer and --route go with one edit")
    elif args.seeds is not None:
        raise ValueError("--seeds goes with --jobs; for one edit use --seed")
    if route == "answer":
        if args.output is not None:
            raise ValueError("--answer prints the answer; it writes no image, so drop -o")
    elif args.output is None:
        raise ValueError("give -o OUTPUT (the image to write; with --jobs, the output folder)")
    if args.rewrite and (args.conversation is not None or route != "edit" or len(args.inputs) > 2):
        raise ValueError("--rewrite works on a plain one-image edit, not with a second image, --conversation or --route")
    if args.snap and (args.conversation is not None or route == "auto" or len(args.inputs) > 2):
        raise ValueError("--snap pads one input image; it cannot be used with a second image or a conversation")
    if args.task_head is not None and not Path(args.task_head).is_file():
        raise ValueError(f"--task-head {args.task_head} is not a file")


def _input_and_instruction(args, demo: bool, continuing: bool) -> tuple[tuple[str | None, str | None], str | None]:
    """The turn's image paths (Image 1, Image 2; None where not given) and instruction, from the
    positional arguments; ((None, None), None) with --jobs. The demo's sample and instruction
    stand in for missing ones; a continued conversation may take no new image."""
    if args.jobs is not None:
        return (None, None), None
    given = list(args.inputs)
    if len(given) > MAX_IMAGES_PER_TURN + 1:
        raise ValueError(f"{len(given) - 1} images given but a turn takes at most {MAX_IMAGES_PER_TURN} "
                         f"(Image 1 and an optional Image 2): give [IMAGE [IMAGE2]] INSTRUCTION")
    if demo and len(given) <= 1 and not continuing:
        image = given[0] if given else str(Path(__file__).resolve().parent.parent / "assets" / "sample.png")
        print(f"gie-edit: demo: no instruction given, using '{DEMO_INSTRUCTION}'", file=sys.stderr)
        images, instruction = [image], DEMO_INSTRUCTION
    elif not given or (len(given) == 1 and not continuing):
        raise ValueError("give the INPUT image and the INSTRUCTION (or --jobs LIST)")
    else:
        images, instruction = given[:-1], given[-1]
    check_instruction(instruction)  # an empty one is refused, never replaced
    images += [None] * (2 - len(images))
    return (images[0], images[1]), instruction


def _check_weight_paths(args) -> None:
    for flag, value, kind in (("--qwen", args.qwen, "file"), ("--qwen-tokenizer", args.qwen_tokenizer, "dir"),
                              ("--connector", args.connector, "file")):
        if value is not None and not (Path(value).is_file() if kind == "file" else Path(value).is_dir()):
            raise ValueError(f"{flag} {value} is not {'a file' if kind == 'file' else 'a folder'}")


def _check_loading(args, demo: bool, gie_dir, kontext_dir, mode: str, dtype, device) -> dict:
    """The weight sources and storage choices of the load (files, LoRAs, quantizations), each
    checked against its source by :func:`gie_core.engine.pipeline.plan_paths` (headers only)."""
    loras = tuple(parse_lora(v) for v in args.lora)
    weights = dict(
        transformer_file=args.transformer, vae_file=args.vae, t5_file=args.t5, clip_file=args.clip,
        tokenizer_dir=args.tokenizers, connector_file=args.connector, qwen_file=args.qwen,
        qwen_tokenizer_dir=args.qwen_tokenizer, lora_files=loras, mode=mode, dtype=dtype, device=device,
        transformer_quantize=args.quantize_transformer, qwen_quantize=args.quantize_qwen,
        task_head_file=args.task_head, lm_head=False,
    )
    if not demo:  # every weight choice checked against its source (headers only); the demo's are built below
        plan_paths(gie_dir=gie_dir, kontext_dir=kontext_dir, **weights)
    return weights


def _check_rewrite(args, inputs: EditInputs) -> None:
    if not args.rewrite:
        return
    if (not inputs.demo and not inputs.gie_dir and not args.qwen) or not fusion_mode(inputs.mode).needs_qwen:
        raise ValueError(
            "--rewrite needs the Qwen2.5-VL of a GPT-Image-Edit checkpoint: give --model and a mode that uses the VLM (not 't5')"
        )
    check_rewrite_options(args.rewrite_max_tokens, 0.0, 0, 1.0)


def _runnable(acceleration, device):
    """The speed choices this machine can run: what it cannot falls back to the default, said
    once, before loading."""
    effective = acceleration.effective(device, log=False)
    for note in effective.notes:
        print(f"gie-edit: note: {note}", file=sys.stderr)
    return effective


def _load_pipeline(args, inputs: EditInputs):
    """The models, loaded once (the demo's tiny random set is built into the cache first)."""
    gie_dir, kontext_dir = inputs.gie_dir, inputs.kontext_dir
    if inputs.demo:
        from gie_core.testing.tiny import build_tiny_model_set, default_tiny_root  # start-up: the demo builder imports diffusers/transformers model classes (~7 s here); only the demo pays it

        print(
            "gie-edit: no weights given: running the DEMO on tiny RANDOM models (built once in "
            f"{default_tiny_root()}). The output is noise-like: it proves the pipeline runs end to end, "
            "not the editing quality. Pass --model/--kontext (or single files) for real edits.",
            file=sys.stderr,
        )
        tiny = build_tiny_model_set(default_tiny_root())
        gie_dir, kontext_dir = tiny.gie_dir, tiny.kontext_dir
    return EditPipeline.from_paths(gie_dir=gie_dir, kontext_dir=kontext_dir, offload=args.offload, **inputs.load)


def save_conversation(path: str | None, conversation: Conversation) -> None:
    """Replace the conversation file (when one was given) atomically with the extended conversation."""
    if path is not None:
        conversation.save(path)
        print(f"gie-edit: conversation: {path} ({len(conversation)} turns)", file=sys.stderr)


@contextlib.contextmanager
def _progress_bar(quiet: bool, total: int, desc: str):
    """A ``progress(done, total)`` callback drawing a bar on stderr (none with --quiet)."""
    bar = None
    if not quiet:
        bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)

    def progress(done, total):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def _edit_one(args, inputs: EditInputs) -> int:
    image = load_input(inputs.input_path, background=inputs.background)
    request = edit_request(args, inputs, image, args.seed)
    outs = output_paths(args.output, request.batch_size)
    _check_rewrite(args, inputs)
    request = dataclasses.replace(request, acceleration=_runnable(request.acceleration, inputs.device))
    pipe = _load_pipeline(args, inputs)
    instruction = inputs.instruction
    if args.rewrite:
        instruction = rewrite_for_edit(pipe, image, instruction, args.rewrite_max_tokens)
    with _progress_bar(args.quiet, request.steps, "sampling") as progress:
        result = pipe.edit(image, instruction, request=request, negative_instruction=args.negative, progress=progress)
    for im, path in zip(result.images, outs):
        save_image(im, path)
        print(path)
    return 0


def _edit_turn(args, inputs: EditInputs) -> int:
    """A conversation turn: the images (0-2) join the conversation, the request is resolved for its
    size rule, the models load once, the turn is routed, then edited (the image written) or
    answered (the text printed); the conversation file is replaced atomically at the end."""
    images = [load_input(p, f"input image {i + 1}", background=inputs.background)
              for i, p in enumerate((inputs.input_path, inputs.input2)) if p is not None]
    base = inputs.conversation or Conversation()
    pending = base.add_user(inputs.instruction, images)
    if inputs.route == "edit":
        pending.check_edit_fits()
    sizing = pending.sizing_sizes()
    request = edit_request(args, inputs, sizing[0], args.seed, sizing[1:])
    outs = output_paths(args.output, request.batch_size)
    request = dataclasses.replace(request, acceleration=_runnable(request.acceleration, inputs.device))
    pipe = _load_pipeline(args, inputs)
    decision = pipe.route(pending, inputs.route)
    if inputs.route == "auto":
        print(f"gie-edit: route: {decision.note}", file=sys.stderr)
    if decision.decision == "answer":
        answered = pipe.answer_turn(pending, args.max_new_tokens)
        print(answered.text)
        save_conversation(args.conversation, answered.conversation)
        return 0
    pending.check_edit_fits()
    encoded = pipe.encode_turn(base, inputs.instruction, images, request=request, negative_instruction=args.negative)
    with _progress_bar(args.quiet, request.steps, "sampling") as progress:
        result = pipe.render(encoded, progress=progress)
    for im, path in zip(result.images, outs):
        save_image(im, path)
        print(path)
    save_conversation(args.conversation, result.conversation)
    return 0


def _edit_jobs(args, inputs: EditInputs) -> int:
    plan, requests = _plan_jobs(args, lambda image, seed, more: edit_request(args, inputs, image, seed, more),
                                inputs.background)
    effective = _runnable(next(iter(requests.values())).acceleration, inputs.device)
    requests = {job: dataclasses.replace(r, acceleration=effective) for job, r in requests.items()}
    todo = [item for item in plan if not item.done]
    made = len(plan) - len(todo)
    if made:
        print(f"gie-edit: {made} of {len(plan)} outputs exist already (kept); {len(todo)} to make", file=sys.stderr)
    if not todo:
        return 0  # nothing to do: nothing is loaded
    pipe = _load_pipeline(args, inputs)
    return _run_jobs(args, pipe, plan, requests, inputs.background)


def _plan_jobs(args, resolve, background):
    """The jobs, their outputs and their resolved requests: every job's image is read and its
    request resolved now, so a bad job stops the run before anything loads."""
    out_dir = Path(args.output)
    if out_dir.suffix.lower() in OUTPUT_SUFFIXES:
        raise ValueError(f"with --jobs, -o is the output folder, not a file ('{args.output}')")
    check_output_path(out_dir / "gie-edit-probe.png", "output folder")
    seeds = parse_seeds(args.seeds, "--seeds") if args.seeds is not None else parse_seeds(args.seed, "--seed")
    requests = {}

    def check(job):  # every job's problems are gathered by read_jobs and reported together
        check_instruction(job.instruction)
        more = [load_input(str(job.image2), "image2", background=background).size] if job.image2 is not None else []
        requests[job] = resolve(load_input(str(job.image), background=background), job.seeds[0], more)

    jobs = read_jobs(args.jobs, default_seeds=seeds, check=check)
    batch = next(iter(requests.values())).batch_size
    return plan_outputs(jobs, out_dir, batch), requests


def _run_jobs(args, pipe, plan, requests, background) -> int:
    todo = [item for item in plan if not item.done]
    total = sum(requests[i.job].steps for i in todo)
    with _progress_bar(args.quiet, total, f"{len(todo)} edits") as progress:
        run_jobs(pipe, plan, requests, load_image=lambda job: load_input(str(job.image), background=background),
                 save=save_image, progress=progress, written=lambda path: print(path, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
