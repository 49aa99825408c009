"""``gie-rewrite``: rewrite an edit instruction for an image with the checkpoint's own Qwen2.5-VL.

Prints the rewritten instruction (the Edit field) on stdout, or the whole result as JSON with
``--json``. When the model's answer can't be used, the original instruction is printed, a
warning on stderr says why, and the exit code is still 0 (the output is always usable).
"""

from __future__ import annotations

import argparse
import json
import sys

from gie_core.cli.common import device_and_dtype, load_input, quiet_library_warnings, run_command
from gie_core.cli.help import HelpFormatter
from gie_core.constants import AUTO_DTYPE, DTYPE_NAMES
from gie_core.engine.encoders import check_instruction
from gie_core.engine.rewrite import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT, check_rewrite_options, rewrite_instruction
from gie_core.weights.parts import load_part


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gie-rewrite",
        description=(
            "Rewrite an edit instruction into an explicit one (the reference's 'thinking-rewritten' prompts) with the "
            "Qwen2.5-VL inside a GPT-Image-Edit checkpoint, offline. The model describes the image (Input), the exact "
            "change naming what to keep (Edit) and the expected result (Output); the Edit field is printed. "
            "Greedy by default: the same image and instruction give the same rewrite."
        ),
        formatter_class=HelpFormatter,
        epilog=(
            "examples:\n"
            "  gie-rewrite photo.jpg 'change the background to a city street' --model gpt-image-edit/final_checkpoint\n"
            "  gie-rewrite photo.jpg 'make it winter' --model ckpt --json\n"
            "  gie-edit photo.jpg 'make it winter' -o out.png --model ckpt --kontext FLUX.1-Kontext-dev --rewrite\n"
        ),
        allow_abbrev=False,
    )
    p.add_argument("image", help="the image to edit (PNG/JPEG/WebP...)")
    p.add_argument("instruction", help="the edit instruction to rewrite")
    p.add_argument("--model", required=True, help="GPT-Image-Edit checkpoint directory (only its Qwen2.5-VL is loaded)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"bound on the answer's length, 1..{MAX_NEW_TOKENS_LIMIT} (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, deterministic (default); above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling bound when sampling (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; same seed, same text (default 0)")
    p.add_argument("--json", action="store_true", help="print the whole result (fields, raw answer, fallback) as JSON")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else mps, else cpu)")
    p.add_argument("--dtype", choices=(AUTO_DTYPE, *DTYPE_NAMES), help="weights dtype (default bf16 on GPU, fp32 on CPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("gie-rewrite", lambda: run(args))


def run(args) -> int:
    quiet_library_warnings()
    check_instruction(args.instruction)
    check_rewrite_options(args.max_new_tokens, args.temperature, args.seed, args.top_p)
    image = load_input(args.image)
    device, dtype = device_and_dtype(args.device, args.dtype)
    encoder = load_part("qwen", args.model, dtype=dtype).module
    encoder.model.to(device)
    result = rewrite_instruction(
        encoder, image, args.instruction, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        seed=args.seed, top_p=args.top_p,
    )
    if result.fell_back:
        print(f"gie-rewrite: warning: kept the original instruction: {result.reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(result.instruction)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
