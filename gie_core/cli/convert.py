"""``gie-convert``: split a GPT-Image-Edit checkpoint into the single files ComfyUI users keep.

Writes, under ``--out`` (point it at ComfyUI's ``models`` folder): ``diffusion_models/`` (the
fine-tuned Kontext transformer, BFL layout: native Load Diffusion Model reads it),
``text_encoders/`` (the Qwen2.5-VL, ComfyUI's layout) and ``gie_connectors/`` (the connector, and
the task head as safetensors when the folder ships ``task_head_final.pt``).
``--compare-qwen FILE`` says whether the checkpoint's Qwen equals a stock Qwen2.5-VL file, so
you can keep the one you have instead of a second 15 GB copy.
"""

from __future__ import annotations

import argparse
import sys

from gie_core.cli.common import run_command
from gie_core.cli.help import HelpFormatter
from gie_core.constants import TASK_HEAD_PT
from gie_core.weights.convert import CONVERT_PARTS, DEFAULT_CONVERT_PARTS, FORMATS, TRANSFORMER_FORMATS, compare_qwen, convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gie-convert",
        description=(
            "Split a GPT-Image-Edit checkpoint (the released final_checkpoint/ folder, or a gie-train export) into "
            "single files: the Kontext transformer for ComfyUI's Load Diffusion Model, the Qwen2.5-VL for "
            "text_encoders/, and the connector. Streamed tensor by tensor; each file is written atomically."
        ),
        formatter_class=HelpFormatter,
        epilog=(
            "examples:\n"
            "  gie-convert gpt-image-edit/final_checkpoint --out ComfyUI/models\n"
            "  gie-convert gpt-image-edit/final_checkpoint --out ComfyUI/models --parts transformer "
            "--transformer-format fp8_scaled\n"
            "  gie-convert gpt-image-edit/final_checkpoint --compare-qwen ComfyUI/models/text_encoders/qwen_2.5_vl_7b.safetensors\n"
            "  gie-convert runs/stage2/export --out ComfyUI/models --name my-edit   # transformer + connector\n"
        ),
        allow_abbrev=False,
    )
    p.add_argument("source", help="the GPT-Image-Edit checkpoint folder, or a gie-train export folder")
    p.add_argument("--out", help="where to write (a ComfyUI models folder: files go to diffusion_models/, "
                                 "text_encoders/ and gie_connectors/ under it)")
    p.add_argument("--parts", default=None,
                   help=f"comma-separated parts to write, of {','.join(CONVERT_PARTS)} (default: "
                        f"{','.join(DEFAULT_CONVERT_PARTS)}, and task_head when the folder has {TASK_HEAD_PT}; "
                        "an export has no qwen)")
    p.add_argument("--transformer-format", choices=TRANSFORMER_FORMATS, default="bf16",
                   help="transformer storage: bf16 (default, 23.8 GB), fp8_e4m3fn or fp8_scaled (ComfyUI's scaled fp8, "
                        "11.9 GB), fp16, fp32, or gguf_q8_0 (a .gguf file for ComfyUI-GGUF and gie-edit, ~12.6 GB)")
    p.add_argument("--qwen-format", choices=FORMATS, default="bf16", help="Qwen2.5-VL storage (default bf16, 15.2 GB)")
    p.add_argument("--lm-head", action="store_true",
                   help="include the Qwen lm_head (1 GB in bf16): needed only for instruction rewriting")
    p.add_argument("--name", default="gpt-image-edit", help="file name stem (default gpt-image-edit)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--compare-qwen", metavar="FILE",
                   help="say whether the checkpoint's Qwen2.5-VL equals this stock file (exit 0 equal, 3 different)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("gie-convert", lambda: run(args))


def run(args) -> int:
    if args.out is None and args.compare_qwen is None:
        raise ValueError("give --out DIR to convert, or --compare-qwen FILE to compare")
    status = 0
    if args.compare_qwen is not None:
        result = compare_qwen(args.source, args.compare_qwen, lm_head=args.lm_head)
        print(f"Qwen2.5-VL vs {args.compare_qwen}: {result.summary()}")
        status = 0 if result.equal else 3
    if args.out is not None:
        parts = None if args.parts is None else [p.strip() for p in args.parts.split(",") if p.strip()]

        def report(part, path):
            print(f"{part}: {path}", file=sys.stderr if args.compare_qwen else sys.stdout)

        convert(
            args.source, args.out, parts=parts, transformer_format=args.transformer_format, qwen_format=args.qwen_format,
            lm_head=args.lm_head, name=args.name, overwrite=args.overwrite, progress=report,
        )
    return status


if __name__ == "__main__":
    raise SystemExit(main())
