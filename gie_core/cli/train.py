"""``gie-train``: the two-stage GPT-Image-Edit trainer, without ComfyUI.

    gie-train --config training/stage1.yaml                       # train (the default command)
    gie-train --config training/stage1.yaml --train.max_steps 100 --set optim.lr=5e-4
    gie-train cache --config training/stage1.yaml                 # precompute features and latents
    gie-train export --config training/stage2.yaml --checkpoint latest --out exported/
    gie-train plan training/stage2.yaml --budget 24GB             # peak GPU memory, and what to change to fit
    accelerate launch --config_file training/accelerate_deepspeed_zero2.yaml -m gie_core.cli.train --config training/stage2.yaml

Every option of the config file can be given on the command line by its full dotted name
(``--optim.lr 1e-4``, ``--train.max_steps 100`` or ``--train.max-steps 100``, or
``--set optim.lr=1e-4``); ``gie-train --help`` lists them with their defaults. There are no short
or abbreviated flags: ``--steps`` or ``--lr`` is refused, naming the options it may mean.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings

from gie_core.cli.help import HelpFormatter, help_with_default
from gie_core.files import describe_os_error
from gie_core.train.allocator import configure_allocator
from gie_core.train.config import (
    ConfigError,
    add_config_arguments,
    config_from_args,
    missing_bases,
    reject_unknown_arguments,
)

COMMANDS = ("train", "cache", "export", "plan")
EXIT_DOES_NOT_FIT = 3  # gie-train plan --budget: the run does not fit


def build_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"gie-train {command}" if command != "train" else "gie-train",
        usage=f"gie-train{'' if command == 'train' else ' ' + command}{' [CONFIG ...]' if command == 'plan' else ''} "
              "[--config FILE] [--OPTION VALUE ...] [--set KEY=VALUE ...]"
              + (" [--checkpoint latest|DIR] [--out DIR]" if command == "export" else "")
              + (" [--budget SIZE] [--device cuda|cpu] [--processes N] [--sharding none|zero2|zero3]" if command == "plan" else ""),
        description={
            "train": "Train the GPT-Image-Edit connector (stage 1) or connector + Kontext transformer (stage 2). "
                     "Other commands: 'gie-train cache' precomputes features, 'gie-train export' writes weights from a checkpoint.",
            "cache": "Precompute Qwen-VL / T5 / CLIP features and VAE latents into data.cache_dir, "
                     "so training needs no encoder (then set data.use_cache true).",
            "export": "Write connector / transformer / LoRA safetensors (and optionally a released-layout directory) "
                      "from a checkpoint of a run.",
            "plan": "Print the peak GPU memory a run will need (weights per dtype, gradients, optimizer state, "
                    "activations, inputs), computed from the real module shapes on the meta device before any weight "
                    "is read, and with --budget what to change to fit. Exit status 3 when it does not fit the budget.",
        }[command],
        formatter_class=HelpFormatter,
        epilog=__doc__,
        allow_abbrev=False,  # '--validation.step' must be an error, not silently '--validation.steps'
    )
    if command == "export":
        p.add_argument("--checkpoint", default="latest", help="'latest' (in output_dir) or a checkpoint directory (default latest)")
        p.add_argument("--out", default=None, help="output folder (default: export.dir, else output_dir/export)")
    if command == "plan":
        from gie_core.train.plan import SHARDINGS  # start-up: train.plan imports torch, diffusers and transformers models (seconds); only 'gie-train plan' needs it

        p.add_argument("config_files", nargs="*", metavar="CONFIG", help="config files (as --config; later ones win)")
        p.add_argument("--budget", default=None, metavar="SIZE",
                       help="GPU memory to fit, e.g. 24GB, 80GiB, 16000MB (GB = GiB: a '24 GB' card holds 24 GiB)")
        p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="the device the run trains on (default cuda)")
        p.add_argument("--processes", type=int, default=1, metavar="N", help="processes (GPUs) of the run (default 1)")
        p.add_argument("--sharding", default="none", choices=SHARDINGS,
                       help="none (one GPU or DDP), zero2 (DeepSpeed ZeRO-2 / FSDP SHARD_GRAD_OP), zero3 (ZeRO-3 / FSDP FULL_SHARD)")
    add_config_arguments(p, help_with_default)
    return p


def layering_hint(command: str, argv: list[str], config_files: list[str]) -> str:
    """For a config file given without the one it is layered over (its opening comment says
    "layered over training/stage2.yaml", as training/24gb_stage2.yaml does): what it is layered
    over, and the exact command with that file put before it. "" when nothing is missing."""
    missing = missing_bases(config_files)
    if not missing:
        return ""
    fixed = list(argv)
    for overlay, base in missing:
        if f"--config={overlay}" in fixed:
            i = fixed.index(f"--config={overlay}")
            fixed[i:i] = [f"--config={base}"]
        elif overlay in fixed:
            i = fixed.index(overlay)
            if i > 0 and fixed[i - 1] == "--config":
                fixed[i - 1:i - 1] = ["--config", str(base)]
            else:
                fixed[i:i] = [str(base)]
    prog = "gie-train" if command == "train" else f"gie-train {command}"
    what = "; ".join(f"{overlay} is layered over {base}" for overlay, base in missing)
    return f"{what}; give that first:\n  {prog} {shlex.join(fixed)}"


def _setup_logging() -> None:
    main_process = int(os.environ.get("RANK", "0")) == 0  # other processes of a launch report only problems
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL", "diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gie-train``; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local paths only: never reach the hub
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    parser = build_parser(command)
    args, extras = parser.parse_known_args(argv)
    if command == "plan":
        args.config = list(args.config_files) + list(args.config)
    layering = layering_hint(command, argv, args.config)
    try:
        reject_unknown_arguments(extras)
        cfg = config_from_args(args, for_training=command not in ("export", "plan"))
    except ConfigError as exc:
        parser.error(f"{exc}\nnote: {layering}" if layering else str(exc))
    if command == "plan":
        if layering:
            print(f"note: {layering}")
        return _plan(parser, args, cfg)
    if layering:
        print(f"gie-train: note: {layering}", file=sys.stderr)
    allocator = configure_allocator()  # before torch sets up CUDA (nothing above imports torch)
    _setup_logging()
    log = logging.getLogger("gie_core.train")
    log.info("%s", allocator)
    try:
        return _run(command, parser, args, cfg, log)
    except KeyboardInterrupt:
        log.error("interrupted; resume with --checkpoint.resume latest")
        return 130
    except OSError as exc:  # a full disk names its path
        log.error("%s", describe_os_error(exc))
        return 2
    except ValueError as exc:
        log.error("%s", exc)
        return 2


def _run(command: str, parser: argparse.ArgumentParser, args: argparse.Namespace, cfg, log: logging.Logger) -> int:
    """``gie-train``, ``gie-train cache`` or ``gie-train export`` with the checked config."""
    from gie_core.train.engine import check_requested_engine  # start-up: imports torch (~3 s); --help and config errors stay quick

    check_requested_engine()  # before the heavy imports: a DeepSpeed/FSDP launch on a machine without GPUs
    if command == "cache":
        from gie_core.train.cache import build_cache  # start-up: torch, accelerate and the models; only 'gie-train cache' needs it

        if not cfg.data.cache_dir:
            parser.error("data.cache_dir is not set (where to write the cache)")
        counts = build_cache(cfg, progress=cfg.log.progress)
        log.info("cache: %(pairs)d pairs, %(written)d written, %(bad)d bad", counts)
        return 0
    from gie_core.train.trainer import Trainer  # start-up: torch, diffusers, accelerate (seconds); only a run or export needs it

    if command == "export":
        if not cfg.model.kontext:
            parser.error("model.kontext is not set (the FLUX.1-Kontext-dev directory of the run)")
        cfg.checkpoint.resume = args.checkpoint
        trainer = Trainer(cfg).setup(data=False)
        if trainer.last_checkpoint is None:
            parser.error(f"no checkpoint found for --checkpoint {args.checkpoint} in {trainer.checkpoint_dir}")
        for kind, path in trainer.export(args.out).items():
            log.info("exported %s: %s", kind, path)
        return 0
    result = Trainer(cfg).train()
    log.info("finished at step %d (%.2f steps/s); %s", result.step, result.steps_per_second, result.problems)
    for kind, path in result.exported.items():
        log.info("exported %s: %s", kind, path)
    return 0


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg) -> int:
    """``gie-train plan``: print the memory plan (and the changes that fit --budget)."""
    from gie_core.train.plan import fit_budget, format_plan, parse_budget, plan_memory  # start-up: as SHARDINGS above

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    try:
        budget = parse_budget(args.budget) if args.budget else None
        if args.processes < 1:
            raise ValueError(f"--processes is {args.processes} but must be at least 1")
        plan = plan_memory(cfg, device=args.device, processes=args.processes, sharding=args.sharding)
        changes = fit_budget(cfg, budget, device=args.device, processes=args.processes, sharding=args.sharding,
                             plan=plan) if budget else None
    except ValueError as exc:
        parser.error(str(exc))
    print(format_plan(plan, budget, changes, " ".join(args.config)))
    if budget is not None and not plan.fits(budget):  # as configured: `plan ... && gie-train ...` never starts a run that does not fit
        return EXIT_DOES_NOT_FIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
