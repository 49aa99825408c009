"""``gie-ask``: answer a question about one or two images (or continue a conversation) in text.

The reference app's understanding branch: the checkpoint's Qwen2.5-VL generates the reply
greedily (``max_new_tokens`` 128 by default); only the Qwen loads (no Kontext, no VAE). Same as
``gie-edit --answer``, whose helpers live here::

    gie-ask image.png "what does the sign say?" --model gpt-image-edit/final_checkpoint
    gie-ask a.png b.png "what differs between the two images?" --model ...
    gie-ask "and what colour is it?" --conversation chat.json --model ...

Every input (images, the conversation file, the weights' headers) is checked before any weight
is read; with ``--conversation`` the question and answer are appended to the file atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gie_core.cli.common import device_and_dtype, load_input, run_command
from gie_core.cli.help import HelpFormatter
from gie_core.constants import ANSWER_MAX_NEW_TOKENS, ANSWER_MAX_NEW_TOKENS_RANGE, AUTO_DTYPE, DTYPE_NAMES, LOAD_DEFAULTS, MAX_IMAGES_PER_TURN
from gie_core.checks import check_int
from gie_core.engine.conversation import Conversation
from gie_core.engine.encoders import check_instruction
from gie_core.weights.parts import check_load, load
from gie_core.weights.quantize import NO_QUANTIZATION, quantize_choices


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gie-ask",
        description=("Answer a question about one or two images with GPT-Image-Edit's Qwen2.5-VL (the reference app's "
                     "answers; greedy, text on stdout). Only the Qwen loads. With no weights given, runs on tiny "
                     "random models (the answer is noise: it proves the path)."),
        formatter_class=HelpFormatter,
        epilog=("examples:\n"
                "  gie-ask image.png 'what does the sign say?' --model gpt-image-edit/final_checkpoint\n"
                "  gie-ask a.png b.png 'what differs?' --model ... --conversation chat.json\n"
                "  gie-ask 'and its colour?' --conversation chat.json --model ...\n"),
        allow_abbrev=False,
    )
    p.add_argument("inputs", nargs="+", metavar="[IMAGE [IMAGE2]] QUESTION",
                   help=f"up to {MAX_IMAGES_PER_TURN} images, then the question (the images may be left out with "
                        "--conversation)")
    p.add_argument("--conversation", metavar="FILE",
                   help="a conversation file to continue (made when missing); the question and answer are appended")
    p.add_argument("--max-new-tokens", type=int, default=ANSWER_MAX_NEW_TOKENS,
                   help=f"bound on the answer's length (default {ANSWER_MAX_NEW_TOKENS}, the app's)")
    p.add_argument("--model", help="GPT-Image-Edit checkpoint folder (its Qwen2.5-VL answers)")
    p.add_argument("--qwen", help="single-file Qwen2.5-VL instead of the checkpoint's (written with its lm_head)")
    p.add_argument("--qwen-tokenizer", help="the Qwen tokenizer folder for --qwen (default: --model)")
    p.add_argument("--quantize-qwen", default=NO_QUANTIZATION, choices=quantize_choices("qwen"),
                   help="store Qwen2.5-VL lighter (see gie-edit --help)")
    p.add_argument("--dtype", choices=[AUTO_DTYPE, *DTYPE_NAMES], default=LOAD_DEFAULTS["cli"].dtype,
                   help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else mps, else cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    return run_command("gie-ask", lambda: run(args))


def run(args) -> int:
    demo = not (args.model or args.qwen)
    conversation = load_conversation(args.conversation)
    given = list(args.inputs)
    if len(given) > MAX_IMAGES_PER_TURN + 1:
        raise ValueError(f"{len(given) - 1} images given but a turn takes at most {MAX_IMAGES_PER_TURN} "
                         "(Image 1 and an optional Image 2): give [IMAGE [IMAGE2]] QUESTION")
    if len(given) == 1 and conversation is None:
        raise ValueError("give the IMAGE and the QUESTION (or --conversation FILE to ask about its images)")
    question = check_instruction(given[-1])
    images = [load_input(p, f"input image {i + 1}") for i, p in enumerate(given[:-1])]
    device, dtype = device_and_dtype(args.device, args.dtype)
    plan = answer_plan(args, demo, dtype, device)
    text, conv = answer(plan, conversation, question, images, args.max_new_tokens)
    print(text)
    if args.conversation is not None:
        conv.save(args.conversation)
    return 0


def load_conversation(path: str | None) -> Conversation | None:
    """The conversation of ``--conversation FILE``: None without the option, a new one when the
    file does not exist yet (its folder must), else the file read and checked (corrupt or foreign
    files are refused naming the file)."""
    if path is None:
        return None
    p = Path(path)
    if p.suffix.lower() != ".json":
        raise ValueError(f"--conversation {path} must be a .json file")
    if not p.exists():
        if not p.parent.is_dir():
            raise ValueError(f"--conversation {path}: folder {p.parent} does not exist")
        return Conversation()
    return Conversation.load(p)


def answer_plan(args, demo: bool, dtype, device):
    """The checked load of the answering Qwen2.5-VL (the checkpoint's, a single file, or the demo's
    tiny one); nothing is read but headers."""
    check_int("--max-new-tokens", args.max_new_tokens, *ANSWER_MAX_NEW_TOKENS_RANGE)
    if demo:
        from gie_core.testing.tiny import build_tiny_model_set, default_tiny_root  # start-up: only the demo builds models

        print("gie-ask: no weights given: answering with tiny RANDOM models (the text is noise; pass --model)",
              file=sys.stderr)
        source, options = build_tiny_model_set(default_tiny_root()).gie_dir, {}
    elif args.qwen is not None:
        source = args.qwen
        options = {"tokenizer_dir": args.qwen_tokenizer or args.model}
        if options["tokenizer_dir"] is None:
            raise ValueError("--qwen needs its tokenizer: pass --qwen-tokenizer DIR (or --model)")
    else:
        source, options = args.model, {}
    return check_load("qwen", source, args.quantize_qwen, dtype=dtype, device=device, run_device=device,
                      lm_head=True, **options)


def answer(plan, conversation: Conversation | None, question: str, images, max_new_tokens: int):
    """(answer text, the conversation with the question and answer) from the planned Qwen."""
    pending = (conversation or Conversation()).add_user(question, images)
    encoder = load(plan).module
    text = encoder.answer(pending, max_new_tokens)
    return text, pending.add_assistant_text(text)


def answer_one(args, inputs) -> int:
    """``gie-edit --answer``: the same as gie-ask with gie-edit's checked inputs."""
    images = [load_input(p, f"input image {i + 1}") for i, p in enumerate((inputs.input_path, inputs.input2))
              if p is not None]
    text, conv = answer(inputs.load["plan"], inputs.conversation, inputs.instruction, images, args.max_new_tokens)
    print(text)
    if args.conversation is not None:
        conv.save(args.conversation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
