"""``gie-edit``: edit one image by an instruction from the command line.

With no weights given it runs a demo: a tiny random model set in the real on-disk layouts is
built once into the user's cache and the whole pipeline runs on a bundled sample image.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

DEMO_INSTRUCTION = "make the sky a warm sunset"
DEMO_AREA = 256 * 256  # the tiny models prove the pipeline; a small output keeps the demo quick


def build_parser() -> argparse.ArgumentParser:
    from ..constants import DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS, FUSION_MODES
    from ..constants import OFFLOAD_MODES

    p = argparse.ArgumentParser(
        prog="gie-edit",
        description=(
            "Edit an image by an instruction with GPT-Image-Edit (Qwen2.5-VL + T5 fused into FLUX.1 Kontext [dev]). "
            "Weights are read from local paths only. With no weights given, runs a demo on tiny random models "
            "(built once into your cache) and a bundled sample image: it proves the pipeline, not the quality."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  gie-edit photo.jpg 'make it winter' -o out.png --model gpt-image-edit/final_checkpoint --kontext FLUX.1-Kontext-dev\n"
            "  gie-edit photo.jpg 'make it winter' -o out.png --mode t5 --transformer flux1-kontext-dev.safetensors \\\n"
            "      --vae ae.safetensors --t5 t5xxl_fp16.safetensors --clip clip_l.safetensors --tokenizers FLUX.1-Kontext-dev\n"
            "  gie-edit -o demo.png            # demo on tiny random models\n"
        ),
    )
    p.add_argument("input", nargs="?", help="image to edit (PNG/JPEG/WebP...); the demo uses a bundled sample")
    p.add_argument("instruction", nargs="?", help="the edit, e.g. 'replace the sky with a sunset'")
    p.add_argument("-o", "--output", required=True, help="output PNG path; with --batch N, files OUTPUT_0.png ... are written")
    w = p.add_argument_group("weights (local paths only)")
    w.add_argument("--model", help="GPT-Image-Edit checkpoint directory (the released final_checkpoint layout)")
    w.add_argument("--kontext", help="FLUX.1-Kontext-dev diffusers directory (VAE, CLIP, T5, tokenizers, scheduler, stock transformer)")
    w.add_argument("--transformer", help="single-file Kontext transformer (e.g. flux1-kontext-dev.safetensors, BFL layout, fp8 ok)")
    w.add_argument("--vae", help="single-file FLUX VAE (ae.safetensors)")
    w.add_argument("--t5", help="single-file T5-XXL encoder (t5xxl_fp16.safetensors or an fp8 one)")
    w.add_argument("--clip", help="single-file CLIP-L text encoder (clip_l.safetensors)")
    w.add_argument("--connector", help="connector safetensors (e.g. trained with gie-train) replacing the checkpoint's")
    w.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a FLUX/Kontext LoRA safetensors applied to the transformer, strength 1 unless given; repeatable")
    w.add_argument("--tokenizers", help="folder with tokenizer/ (CLIP) and tokenizer_2/ (T5), for single-file text encoders")
    s = p.add_argument_group("editing")
    s.add_argument("--mode", choices=FUSION_MODES, help="conditioning: vlm+t5 (released model, default with --model), vlm, t5 (stock Kontext, default without --model), or the training modes")
    s.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    s.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"FLUX guidance embedding (default {DEFAULT_GUIDANCE})")
    s.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"noise seed; same seed, same image on any device (default {DEFAULT_SEED})")
    s.add_argument("--size", default="auto", help="output WIDTHxHEIGHT, multiples of 16, or 'auto' (~1 MP at the input's aspect; default)")
    s.add_argument("--batch", type=int, default=1, help="number of images to make (default 1)")
    s.add_argument("--snap", nargs="?", const="default", default=None, metavar="RATIOS",
                   help="pad the input to the nearest ratio (default set 1:1,3:2,2:3; also 'kontext' or a list like '1:1,4:3') "
                        "before editing and crop the padding from the result, back to the input's size")
    s.add_argument("--pad-color", default="white", help="padding colour for --snap: white (default), black, edge, or r,g,b")
    s.add_argument("--negative", default=None, help="negative instruction for true CFG (used with --true-cfg > 1)")
    s.add_argument("--true-cfg", type=float, default=1.0, help="true classifier-free guidance scale; 1 = off (default)")
    s.add_argument("--reference-size", choices=("preferred", "keep"), default=None,
                   help="resize the input to the nearest preferred Kontext resolution (default, as the reference) "
                        "or keep its size (the demo's default, to stay quick)")
    w2 = p.add_argument_group("instruction rewriting")
    w2.add_argument("--rewrite", action="store_true",
                    help="first rewrite the instruction into an explicit one with the checkpoint's Qwen2.5-VL (as gie-rewrite; "
                         "needs --model and a mode using the VLM); the rewrite is printed on stderr")
    w2.add_argument("--rewrite-max-tokens", type=int, default=256, help="bound on the rewriting answer's length (default 256)")
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="weights dtype (default bf16 on GPU, fp32 on CPU)")
    r.add_argument("--offload", choices=OFFLOAD_MODES, default="none",
                   help="none (all on the GPU), model (encoders leave the GPU before the transformer runs), "
                        "sequential (also stream transformer blocks: for 24 GB cards)")
    r.add_argument("--device", default=None, help="torch device (default: cuda if present, else mps, else cpu)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_size(text: str) -> tuple[int, int] | None:
    """'auto' -> None; 'WIDTHxHEIGHT' -> (w, h), each a positive multiple of 16."""
    from ..images import check_output_size

    if text == "auto":
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size '{text}' must be WIDTHxHEIGHT (e.g. 1024x768) or 'auto'") from None
    check_output_size(w, h)
    return w, h


def parse_lora(text: str) -> tuple[str, float]:
    """'file.safetensors' or 'file.safetensors:0.8' -> (path, strength)."""
    path, sep, strength = text.rpartition(":")
    if sep and path.endswith(".safetensors"):
        try:
            return path, float(strength)
        except ValueError:
            raise ValueError(f"--lora '{text}': strength '{strength}' is not a number") from None
    return text, 1.0


def output_paths(output: str, batch: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"output '{output}' must end in .png, .jpg or .webp")
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(batch)]


def save_atomic(image, path: Path) -> None:
    """Write via a temporary file and rename, so a failed save never leaves a partial image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_input(path: str):
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"input image {p} does not exist")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode not in ("RGB",):
                if im.mode in ("RGBA", "LA", "P", "L", "I;16", "CMYK", "YCbCr"):
                    im = im.convert("RGB")  # files are converted; in-memory non-RGB inputs are rejected by the engine
                else:
                    raise ValueError(f"input image {p} has unsupported mode {im.mode}")
            return im.copy()
    except UnidentifiedImageError:
        raise ValueError(f"input image {p} is not an image file PIL can read") from None


def rewrite_for_edit(pipe, image, instruction: str, max_new_tokens: int) -> str:
    """The rewritten instruction (greedy) from the pipeline's loaded Qwen2.5-VL, reported on stderr."""
    from ..rewrite import rewrite_instruction
    from .rewrite import quiet_library_warnings

    quiet_library_warnings()
    with pipe.on_device(pipe.qwen.model):
        result = rewrite_instruction(pipe.qwen, image, instruction, max_new_tokens=max_new_tokens)
    if result.fell_back:
        print(f"gie-edit: warning: --rewrite kept the original instruction: {result.reason}", file=sys.stderr)
    else:
        print(f"gie-edit: rewritten instruction: {result.instruction}", file=sys.stderr)
    return result.instruction


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError) as exc:
        print(f"gie-edit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gie-edit: interrupted; no output written", file=sys.stderr)
        return 130


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    import torch

    from ..pipeline import EditPipeline, default_device

    demo = not any((args.model, args.kontext, args.transformer, args.vae, args.t5, args.clip))
    if args.batch < 1:
        raise ValueError(f"--batch is {args.batch} but must be at least 1")
    size = parse_size(args.size)
    outs = output_paths(args.output, args.batch)
    device = torch.device(args.device) if args.device else default_device()
    dtype = args.dtype or ("fp32" if device.type == "cpu" else "bf16")

    if demo:
        from ..tiny import build_tiny_model_set, default_tiny_root

        print(
            "gie-edit: no weights given: running the DEMO on tiny RANDOM models (built once in "
            f"{default_tiny_root()}). The output is noise-like: it proves the pipeline runs end to end, "
            "not the editing quality. Pass --model/--kontext (or single files) for real edits.",
            file=sys.stderr,
        )
        tiny = build_tiny_model_set(default_tiny_root())
        gie_dir, kontext_dir = tiny.gie_dir, tiny.kontext_dir
        input_path = args.input or str(Path(__file__).resolve().parent.parent / "assets" / "sample.png")
        instruction = args.instruction or DEMO_INSTRUCTION
        if size is None:
            from ..images import auto_output_size

            im = load_input(input_path)
            size = auto_output_size(im.width, im.height, DEMO_AREA)
        reference_size = args.reference_size or "keep"
    else:
        gie_dir, kontext_dir = args.model, args.kontext
        if not args.input or not args.instruction:
            raise ValueError("give the INPUT image and the INSTRUCTION")
        input_path, instruction = args.input, args.instruction
        reference_size = args.reference_size or "preferred"
    from ..encoders import check_instruction

    check_instruction(instruction)
    image = load_input(input_path)
    mode = args.mode or ("vlm+t5" if gie_dir else "t5")
    if args.rewrite:
        from ..rewrite import check_rewrite_options

        if not gie_dir or mode == "t5":
            raise ValueError(
                "--rewrite needs the Qwen2.5-VL of a GPT-Image-Edit checkpoint: give --model and a mode that uses the VLM (not 't5')"
            )
        check_rewrite_options(args.rewrite_max_tokens, 0.0, 0, 1.0)

    pipe = EditPipeline.from_paths(
        gie_dir=gie_dir, kontext_dir=kontext_dir, transformer_file=args.transformer, vae_file=args.vae,
        t5_file=args.t5, clip_file=args.clip, tokenizer_dir=args.tokenizers, connector_file=args.connector,
        lora_files=tuple(parse_lora(v) for v in args.lora), mode=mode, dtype=dtype,
        device=device, offload=args.offload,
    )
    if args.rewrite:
        instruction = rewrite_for_edit(pipe, image, instruction, args.rewrite_max_tokens)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc="sampling", unit="step", file=sys.stderr)

    def progress(done, total):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        result = pipe.edit(
            image, instruction, mode=mode, steps=args.steps, guidance=args.guidance, seed=args.seed, size=size,
            batch_size=args.batch, snap=args.snap, pad_color=args.pad_color, negative_instruction=args.negative,
            true_cfg=args.true_cfg, reference_resize=reference_size, progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    for im, path in zip(result.images, outs):
        save_atomic(im, path)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
