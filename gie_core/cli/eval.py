"""``gie-eval``: reproduce the benchmark tables on your own models, offline.

    gie-eval generate BENCHMARK DATA -o OUT [model options]   edits in the benchmark's own layout
    gie-eval score OUT --judge QWEN_VL_DIR [--similarity]     a local judge; scores per category
    gie-eval compare OUT_A OUT_B ... -o CMP                   tables side by side and a picture grid
    gie-eval report OUT_A [OUT_B ...] -o REPORT.html          one HTML page: charts and samples, worst first
    gie-eval paper --protocol P --imgedit/--gedit ... -o OUT  the paper's tables (plain, rewritten), judged locally

Many GPUs or nodes: ``accelerate launch gie-eval generate ...`` (or ``accelerate launch -m
gie_core.cli.eval generate ...``) splits the samples between the processes; ``score`` shards the
same way. Every input is checked before any weight is read; exit codes as every ``gie-*`` command
(0 done, 2 bad input, 1 failure while running, 130 interrupted). Samples that fail are recorded
and skipped; the run still ends with 0 and says how many failed and where they are listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gie_core.checks import check_int
from gie_core.cli.common import device_and_dtype, run_command
from gie_core.cli.edit import parse_lora, parse_size
from gie_core.cli.help import HelpFormatter
from gie_core.constants import (
    AUTO_DTYPE,
    DEFAULT_GUIDANCE,
    DEFAULT_REFERENCE_RESAMPLE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DTYPE_NAMES,
    LOAD_DEFAULTS,
    OFFLOAD_MODES,
    REFERENCE_RESAMPLE_MODES,
    REFERENCE_RESIZE_MODES,
)
from gie_core.engine.modes import DEFAULT_FUSION_MODE, FUSION_MODES, STOCK_FUSION_MODE
from gie_core.engine.pipeline import EditPipeline
from gie_core.engine.rewrite import DEFAULT_MAX_NEW_TOKENS
from gie_core.eval.benchmarks import BENCHMARKS, COMPLEX_EDIT_IMAGE_TYPES, SelectOptions, benchmark, load_samples
from gie_core.eval.compare import load_scores, write_comparison
from gie_core.eval.paper import (
    PAPER,
    PROTOCOLS,
    VARIANTS,
    comparability,
    imgedit_prompts_file,
    imgedit_scorer_files,
    paper_markdown,
    paper_rows,
    plan_runs,
    protocol,
)
from gie_core.eval.report import DEFAULT_REPORT_SAMPLES, write_html_report
from gie_core.eval.generate import GEOMETRIES, GenerateSettings, run_generate
from gie_core.eval.judge import (
    DEFAULT_JUDGE_MAX_NEW_TOKENS,
    DEFAULT_JUDGE_MAX_PIXELS,
    COMPLEX_EDIT_SAMPLES,
    RUBRICS,
    check_judge,
    check_judge_options,
    check_judge_samples,
    load_judge,
    rubric,
)
from gie_core.eval.metrics import EmbeddingSimilarity
from gie_core.eval.runs import RUN_VERSION, RunFolder, current_shard, plain_cpu, process_device, settings_mismatch
from gie_core.eval.score import EMBED_METRIC, SIMILARITY_METRICS, aggregate, report_markdown, run_score, write_report
from gie_core.files import atomic_write_text, check_output_path

PROG = "gie-eval"


def _selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which samples")
    g.add_argument("--images", help="folder the instruction set's relative image paths are under "
                                     "(default: the set's own folder; ImgEdit: its Benchmark/singleturn folder)")
    g.add_argument("--language", default=None, choices=("en", "cn", "all"),
                   help="GEdit-Bench instruction language (default en: the paper reports GEdit-EN)")
    g.add_argument("--complexity", type=int, default=None, help="Complex-Edit level 1-8 (default 8, the paper's)")
    g.add_argument("--image-type", default=None, choices=COMPLEX_EDIT_IMAGE_TYPES,
                   help="Complex-Edit split when DATA is the dataset folder (default real)")
    g.add_argument("--task-types", default=None,
                   help="comma-separated categories to keep (OmniContext default: single_character,single_object; 'all' keeps every one)")
    g.add_argument("--limit", type=int, default=None, help="only the first N samples (after the filters)")


def _model_args(g: argparse.ArgumentParser, paper: bool = False) -> None:
    """The weights, editing and runtime options of generate (paper: the same, its protocol choosing
    the geometry and its variants the rewriting)."""
    w = g.add_argument_group("weights (local paths only; as gie-edit)")
    w.add_argument("--model", help="GPT-Image-Edit checkpoint directory (the released final_checkpoint layout)")
    w.add_argument("--kontext", help="FLUX.1-Kontext-dev diffusers directory")
    w.add_argument("--transformer", help="single-file Kontext transformer")
    w.add_argument("--vae", help="single-file FLUX VAE")
    w.add_argument("--t5", help="single-file T5-XXL encoder")
    w.add_argument("--clip", help="single-file CLIP-L text encoder")
    w.add_argument("--connector", help="connector safetensors (e.g. from gie-train) replacing the checkpoint's")
    w.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help="a LoRA; repeatable")
    w.add_argument("--tokenizers", help="folder with tokenizer/ and tokenizer_2/, for single-file text encoders")
    e = g.add_argument_group("editing")
    e.add_argument("--mode", choices=FUSION_MODES, help="fusion mode (default vlm+t5 with --model, else t5)")
    e.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    e.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"guidance (default {DEFAULT_GUIDANCE})")
    e.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"base seed; each sample's seed is a hash of (seed, key) (default {DEFAULT_SEED})")
    e.add_argument("--size", default="auto", help="output WIDTHxHEIGHT; a side 0 follows the aspect, 0x0 (or auto) picks both by --geometry")
    e.add_argument("--geometry", choices=GEOMETRIES, default=None if paper else "ours",
                   help="ours: ~1 MP at the input's aspect, reference resized with lanczos; paper: the evaluation geometry "
                        "of the published numbers (output from the nearest Kontext ratio scaled to 1024x1024, reference "
                        "resized with nearest)" + ("; default: the protocol's" if paper else ""))
    e.add_argument("--reference-size", choices=REFERENCE_RESIZE_MODES, default=None,
                   help="resize the input to the nearest preferred Kontext resolution (default) or keep its size")
    e.add_argument("--reference-resample", choices=REFERENCE_RESAMPLE_MODES, default=None,
                   help="how the reference is resized (default lanczos; nearest with --geometry paper)")
    if not paper:
        e.add_argument("--rewrite", action="store_true", help="rewrite each instruction with the checkpoint's Qwen2.5-VL "
                                                              "first (the paper's 'rewritten' scores; the rewrite is logged)")
    e.add_argument("--rewrite-max-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="bound on a rewrite's length")
    r = g.add_argument_group("runtime")
    r.add_argument("--dtype", choices=(AUTO_DTYPE, *DTYPE_NAMES), help="weights dtype (default bf16 on GPU, fp32 on CPU)")
    r.add_argument("--offload", choices=OFFLOAD_MODES, default=LOAD_DEFAULTS["cli"].offload, help="as gie-edit")
    r.add_argument("--device", default=None, help="torch device (default: the process's GPU under accelerate, else cuda/mps/cpu)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")


def _generate_parser(sub, layouts: str) -> None:
    g = sub.add_parser(
        "generate", allow_abbrev=False, formatter_class=HelpFormatter,
        help="edit every sample of a benchmark into the layout its scorer reads",
        description="Edit every sample of a benchmark (resumable, one seed per sample, failures recorded and skipped). "
                    "Under `accelerate launch` the samples are split between the processes.",
        epilog="benchmarks:\n" + layouts,
    )
    g.add_argument("benchmark", choices=tuple(BENCHMARKS), help="which instruction set format DATA is in")
    g.add_argument("data", help="the instruction set: ImgEdit's singleturn JSON, GEdit/Complex-Edit/OmniContext parquet "
                                "(a file or the dataset folder) or JSON/JSONL rows, or your JSONL")
    g.add_argument("-o", "--out", required=True, help="run folder: outputs in the benchmark's layout, plus _gie_eval/ records")
    _selection_args(g)
    _model_args(g)


def _judge_limit_args(p) -> None:
    """The judge's answer and image bounds, as score and paper take them."""
    p.add_argument("--judge-max-new-tokens", type=int, default=DEFAULT_JUDGE_MAX_NEW_TOKENS,
                   help=f"bound on each judge answer (default {DEFAULT_JUDGE_MAX_NEW_TOKENS})")
    p.add_argument("--judge-max-pixels", type=int, default=DEFAULT_JUDGE_MAX_PIXELS,
                   help=f"images are scaled down to at most this many pixels for the judge (default {DEFAULT_JUDGE_MAX_PIXELS})")


def _score_parser(sub) -> None:
    s = sub.add_parser(
        "score", allow_abbrev=False, formatter_class=HelpFormatter,
        help="judge a run folder with a local Qwen2.5-VL; scores per category as JSON, CSV and markdown",
        description="Judge a run folder offline: a Qwen2.5-VL chosen by path (a GPT-Image-Edit checkpoint's own 7B, or a "
                    "stock Qwen2.5-VL folder), and/or reference-free similarity outside the edited region.",
    )
    s.add_argument("run", help="a run folder made by gie-eval generate (or any folder in the benchmark's layout, with --benchmark and --data)")
    s.add_argument("--judge", help="Qwen2.5-VL folder: a GPT-Image-Edit checkpoint or a stock Qwen2.5-VL model")
    s.add_argument("--rubric", choices=tuple(RUBRICS), help="judging rubric (default: the benchmark's)")
    s.add_argument("--similarity", action="store_true",
                   help="also measure PSNR / SSIM to the source outside the edited region (no model needed)")
    s.add_argument("--similarity-model", help="a vision model folder (DINOv2, CLIP...) for embedding similarity outside the edited region")
    s.add_argument("--benchmark", choices=tuple(BENCHMARKS), help="for folders without _gie_eval/run.json")
    s.add_argument("--data", help="the instruction set, for folders without _gie_eval/run.json")
    _selection_args(s)
    _judge_limit_args(s)
    s.add_argument("--judge-samples", type=int, default=None,
                   help=f"answers per question, averaged per criterion (default: the rubric's: {COMPLEX_EDIT_SAMPLES} for "
                        "complex-edit, as its eval.py -n, sampled at temperature 1; 1 greedy answer for the others)")
    s.add_argument("--dtype", choices=(AUTO_DTYPE, *DTYPE_NAMES), help="judge dtype (default bf16 on GPU, fp32 on CPU)")
    s.add_argument("--device", default=None, help="torch device (default: the process's GPU under accelerate, else cuda/mps/cpu)")
    s.add_argument("--quiet", action="store_true", help="no progress bar, no table on stdout")


def _compare_parser(sub) -> None:
    c = sub.add_parser(
        "compare", allow_abbrev=False, formatter_class=HelpFormatter, help="scored runs side by side (a table per metric) and a picture grid",
        description="Tables of several scored runs side by side (a row per category, a column per run), and a PNG grid "
                    "of chosen samples: the source, then each run's output, the instruction as caption.",
    )
    c.add_argument("runs", nargs="+", help="two or more scored run folders")
    c.add_argument("-o", "--out", required=True, help="folder for compare.md, compare.csv, compare.json and grid.png")
    c.add_argument("--names", help="comma-separated column names (default: the folders' names)")
    c.add_argument("--grid", type=int, default=4, help="samples in the grid: the first N every run has (default 4; 0 = no grid)")
    c.add_argument("--grid-keys", help="comma-separated sample keys for the grid (instead of the first N)")
    c.add_argument("--cell", type=int, default=256, help="picture size in the grid, px (default 256)")


def _report_parser(sub) -> None:
    r = sub.add_parser(
        "report", allow_abbrev=False, formatter_class=HelpFormatter, help="one self-contained HTML page of scored runs",
        description="One HTML page, nothing fetched from elsewhere: bar charts of the scores per category (matplotlib), "
                    "and a grid of the samples, worst first: source, each run's output, the instruction, the judge's "
                    "scores and reasons.",
    )
    r.add_argument("runs", nargs="+", help="one or more scored run folders")
    r.add_argument("-o", "--out", required=True, help="the HTML file to write")
    r.add_argument("--names", help="comma-separated run names (default: the folders' names)")
    r.add_argument("--samples", type=int, default=DEFAULT_REPORT_SAMPLES,
                   help=f"samples in the grid, the worst first (default {DEFAULT_REPORT_SAMPLES}; 0 = all)")
    r.add_argument("--cell", type=int, default=192, help="picture size in the grid, px (default 192)")


def _paper_parser(sub) -> None:
    a = sub.add_parser(
        "paper", allow_abbrev=False, formatter_class=HelpFormatter,
        help="reproduce the published ImgEdit and GEdit protocol, plain and rewritten, judged locally",
        description="Generate ImgEdit and/or GEdit plain and with rewriting, in the layouts their scorers read, judge them "
                    "with a local Qwen2.5-VL and print the tables in the paper's layout beside its published figures "
                    "(marked not comparable when the judge differs). Under `accelerate launch` every run is sharded "
                    "as generate and score shard.",
    )
    a.add_argument("--protocol", required=True, choices=tuple(PROTOCOLS),
                   help="gpt-image-edit: its own prompt files (from --upstream) and geometry, what its paper scored; "
                        "benchmark: the benchmarks' current files")
    a.add_argument("--upstream", help="a GPT-Image-Edit checkout (its univa/eval/ files), for --protocol gpt-image-edit")
    a.add_argument("--imgedit", help="ImgEdit-Bench: the folder Benchmark.tar was unpacked into (or its singleturn.json)")
    a.add_argument("--gedit", help="GEdit-Bench: the dataset folder/parquet/JSON (benchmark), or GPT-Image-Edit's "
                                   "gedit-asset folder (gpt-image-edit)")
    a.add_argument("-o", "--out", required=True, help="folder of the runs (imgedit, imgedit-rewritten, gedit, ...) and paper.md")
    a.add_argument("--variants", default=",".join(VARIANTS), help="plain and/or rewritten (default both)")
    a.add_argument("--limit", type=int, default=None, help="only the first N samples of each set (a quick try)")
    j = a.add_argument_group("judge")
    j.add_argument("--judge", required=True, help="Qwen2.5-VL folder: a GPT-Image-Edit checkpoint or a stock Qwen2.5-VL")
    _judge_limit_args(j)
    _model_args(a, paper=True)


def build_parser() -> argparse.ArgumentParser:
    layouts = "\n".join(f"  {b.name:<13} {b.title}: outputs {b.layout}" for b in BENCHMARKS.values())
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=HelpFormatter, epilog="benchmarks:\n" + layouts,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,score,compare,report,paper}")

    _generate_parser(sub, layouts)
    _score_parser(sub)
    _compare_parser(sub)
    _report_parser(sub)
    _paper_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    body = {"generate": generate, "score": score, "compare": compare, "report": report, "paper": paper}[args.command]
    return run_command(PROG, lambda: body(args))


# --------------------------------------------------------------------------------------------


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def _selection(args, recorded: dict | None = None):
    """The sample selection: options given now win over the recorded run's, then the defaults."""
    base = SelectOptions.from_dict(recorded or {})
    limit = base.limit if args.limit is None else check_int("--limit", args.limit, 0, None)
    images = args.images if args.images is not None else base.images
    return SelectOptions(
        images=str(Path(images).resolve()) if images else None,
        language=args.language or base.language, complexity=args.complexity or base.complexity,
        image_type=args.image_type or base.image_type,
        task_types=_split(args.task_types) if args.task_types is not None else base.task_types, limit=limit,
    )


def _device(args, state, shard):
    """The device: given, else this process's accelerator under a launcher (on the CPU plain
    ``cpu``, as a single process uses: see :func:`gie_core.eval.runs.process_device`), else the
    usual default."""
    if args.device is None and shard.num_processes > 1:
        device, dtype = device_and_dtype(process_device(state), args.dtype)
    else:
        device, dtype = device_and_dtype(args.device, args.dtype)
    return plain_cpu(device), dtype


def _generate_settings(args, state, shard) -> tuple[GenerateSettings, tuple, object]:
    """The checked settings of a generate run, its LoRAs as given and the device."""
    if not any((args.model, args.kontext, args.transformer, args.vae, args.t5, args.clip)):
        raise ValueError("give the weights to evaluate: --model and/or --kontext (or single files, as gie-edit takes them)")
    device, dtype = _device(args, state, shard)
    width, height = parse_size(args.size)
    loras = tuple(parse_lora(v) for v in args.lora)
    paper = args.geometry == "paper"
    weights = {k: (str(Path(v).resolve()) if v else None) for k, v in (
        ("model", args.model), ("kontext", args.kontext), ("transformer", args.transformer), ("vae", args.vae),
        ("t5", args.t5), ("clip", args.clip), ("connector", args.connector), ("tokenizers", args.tokenizers))}
    weights["loras"] = [[str(Path(f).resolve()), s] for f, s in loras]
    settings = GenerateSettings(
        mode=args.mode or (DEFAULT_FUSION_MODE if args.model else STOCK_FUSION_MODE),
        steps=args.steps, guidance=args.guidance, seed=args.seed, width=width, height=height,
        geometry=args.geometry, reference_resize=args.reference_size or "preferred",
        reference_resample=args.reference_resample or ("nearest" if paper else DEFAULT_REFERENCE_RESAMPLE),
        rewrite=args.rewrite, rewrite_max_tokens=args.rewrite_max_tokens, dtype=dtype, weights=weights,
    )
    settings.check()
    return settings, loras, device


def _check_run(folder: RunFolder, run: dict) -> None:
    """A new run's folder can be written; a resumed one was made with the same settings. Writes nothing."""
    check_output_path(folder.checked(folder.run_file, "run record"), "run folder")
    recorded = folder.read_run()
    if recorded is None:
        return
    old = {"benchmark": recorded.get("benchmark"), "data": recorded.get("data"), "select": recorded.get("select"),
           **recorded.get("settings", {})}
    new = {"benchmark": run["benchmark"], "data": run["data"], "select": run["select"], **run["settings"]}
    diff = settings_mismatch(old, new)
    if diff:
        raise ValueError(
            f"'{folder.root}' holds a run with other settings ({'; '.join(diff)}); resume it with the same "
            "options, or give another --out folder"
        )


def _record_run(folder: RunFolder, run: dict, shard) -> None:
    """Write run.json once the run is under way (every check passed, the weights loaded), so a
    refused run leaves nothing that would refuse the next one."""
    if shard.is_main and folder.read_run() is None:
        folder.write_run(run)


def _load_pipeline(args, settings: GenerateSettings, loras: tuple, device) -> EditPipeline:
    """The pipeline a generate run edits with (called only when samples are left to make)."""
    return EditPipeline.from_paths(
        gie_dir=args.model, kontext_dir=args.kontext, transformer_file=args.transformer, vae_file=args.vae,
        t5_file=args.t5, clip_file=args.clip, tokenizer_dir=args.tokenizers, connector_file=args.connector,
        lora_files=loras, mode=settings.mode, dtype=settings.dtype, device=device, offload=args.offload,
    )


def _where(shard) -> str:
    return f" (process {shard.process_index + 1} of {shard.num_processes})" if shard.num_processes > 1 else ""


def generate(args) -> int:
    """``gie-eval generate``: every input checked before any weight is read, then the edits."""
    shard, state = current_shard()
    bench = benchmark(args.benchmark)
    folder = RunFolder(args.out)
    sel = _selection(args)
    samples = load_samples(bench.name, args.data, sel)
    settings, loras, device = _generate_settings(args, state, shard)
    run = {"version": RUN_VERSION, "benchmark": bench.name, "data": str(Path(args.data).resolve()),
           "select": sel.to_dict(), "settings": settings.to_dict(), "samples": len(samples)}
    _check_run(folder, run)
    folder.check_outputs(bench, samples)

    def load():
        pipe = _load_pipeline(args, settings, loras, device)
        _record_run(folder, run, shard)
        return pipe

    summary = run_generate(samples, bench, folder, settings, load, shard=shard, progress=not args.quiet)
    _record_run(folder, run, shard)  # nothing was left to make: the record is still written
    print(f"{PROG} generate{_where(shard)}: {summary.made} made, {summary.done_before} already done, "
          f"{len(summary.failed)} failed, of {summary.total} samples", file=sys.stderr)
    for rec in summary.failed[:5]:
        print(f"{PROG}: sample '{rec['key']}' failed: {rec['reason']}", file=sys.stderr)
    if summary.failed:
        print(f"{PROG}: failures are listed in {folder.logs} (they are tried again on the next run)", file=sys.stderr)
    state.wait_for_everyone()
    if shard.is_main:
        print(folder.root)
    return 0


def _judge_samples(args, rub) -> int:
    """Answers per question: --judge-samples, else the rubric's (Complex-Edit's 20)."""
    return rub.samples if args.judge_samples is None else args.judge_samples


def _score_config(args, bench, rub, data: str) -> dict:
    """What decides the scores (kept in the scores folder; a rerun must match it). The judge and
    the similarity model are checked here, before any weight is read."""
    for opt, path in (("--judge", args.judge), ("--similarity-model", args.similarity_model)):
        if path and not Path(path).is_dir():
            raise ValueError(f"{opt} '{path}' is not a folder")
    if args.judge:
        check_judge(args.judge)
        check_judge_options(args.judge_max_new_tokens, args.judge_max_pixels)
        check_judge_samples(_judge_samples(args, rub))
    if args.similarity_model:
        EmbeddingSimilarity.check_path(args.similarity_model)
    return {
        "benchmark": bench.name, "data": str(Path(data).resolve()),
        "judge": str(Path(args.judge).resolve()) if args.judge else None, "rubric": rub.name if rub else None,
        "judge_max_new_tokens": args.judge_max_new_tokens if args.judge else None,
        "judge_max_pixels": args.judge_max_pixels if args.judge else None,
        "judge_samples": _judge_samples(args, rub) if args.judge else None, "similarity": bool(args.similarity),
        "similarity_model": str(Path(args.similarity_model).resolve()) if args.similarity_model else None,
    }


def _check_score_config(folder: RunFolder, config: dict) -> None:
    """Refuse to mix in scores made with other options; check the scores folder can be written. Writes nothing."""
    config_file = folder.scores / "config.json"
    if config_file.is_file():
        old = json.loads(config_file.read_text())
        old.setdefault("judge_samples", 1 if old.get("judge") else None)  # scores made before the option: one answer
        diff = settings_mismatch(old, config)
        if diff:
            raise ValueError(f"'{folder.scores}' holds scores made otherwise ({'; '.join(diff)}); "
                             "score with the same options, or remove that folder to judge afresh")
    check_output_path(folder.checked(config_file, "scores config"), "scores folder")


def _record_score_config(folder: RunFolder, config: dict, shard) -> None:
    """Write the scores' config.json once every check passed and the models loaded (a refused
    score leaves nothing behind that would refuse the next one)."""
    config_file = folder.scores / "config.json"
    if shard.is_main and not config_file.is_file():
        atomic_write_text(folder.checked(config_file, "scores config"), json.dumps(config, indent=2) + "\n")


def _write_score_report(args, samples, folder: RunFolder, bench, rub, embedder, config: dict) -> None:
    """Aggregate every process's judgements into scores.json/.csv/.md; print the table and the paths."""
    metrics = list(rub.metrics if rub else ())
    if args.similarity or embedder is not None:
        metrics += list(SIMILARITY_METRICS)
    if embedder is not None:
        metrics.append(EMBED_METRIC)
    report = aggregate(samples, folder.read_records("judgements"), metrics, {
        "title": f"{bench.title}: {folder.root.resolve().name}", "benchmark": bench.name, "run": str(folder.root.resolve()),
        "judge": config["judge"], "rubric": config["rubric"], "similarity_model": config["similarity_model"],
    }, subsets=bench.subsets)
    paths = write_report(folder, report)
    if not args.quiet:
        print(report_markdown(report))
    for p in paths:
        print(p)


def score(args) -> int:
    """``gie-eval score``: every input checked before any weight is read, then judge and report."""
    shard, state = current_shard()
    folder = RunFolder(args.run)
    if not folder.root.is_dir():
        raise ValueError(f"run folder '{folder.root}' does not exist")
    recorded = folder.read_run() or {}
    name = args.benchmark or recorded.get("benchmark")
    data = args.data or recorded.get("data")
    if not name or not data:
        raise ValueError(f"'{folder.root}' has no _gie_eval/run.json: give --benchmark and --data for outputs made elsewhere")
    bench = benchmark(name)
    samples = load_samples(bench.name, data, _selection(args, recorded.get("select")))
    if not (args.judge or args.similarity or args.similarity_model):
        raise ValueError("nothing to score with: give --judge (a Qwen2.5-VL folder) and/or --similarity / --similarity-model")
    rub = rubric(args.rubric or bench.rubric) if args.judge else None
    config = _score_config(args, bench, rub, data)
    device, dtype = _device(args, state, shard)
    _check_score_config(folder, config)
    folder.check_outputs(bench, samples)

    judge = embedder = None
    if args.judge:
        judge = load_judge(args.judge, dtype=dtype, device=device, max_new_tokens=args.judge_max_new_tokens,
                           max_pixels=args.judge_max_pixels)
    if args.similarity_model:
        embedder = EmbeddingSimilarity.from_path(args.similarity_model, device=device)
    _record_score_config(folder, config, shard)
    summary = run_score(samples, bench, folder, judge=judge, rub=rub, similarity=args.similarity, embedder=embedder,
                        judge_samples=config["judge_samples"],
                        shard=shard, progress=not args.quiet)
    print(f"{PROG} score{_where(shard)}: {summary.judged} judged, {summary.done_before} already judged, {summary.missing} "
          f"without an output, {len(summary.failed)} failed, of {summary.total} samples", file=sys.stderr)
    for rec in summary.failed[:5]:
        print(f"{PROG}: sample '{rec['key']}' could not be judged: {rec['reason']}", file=sys.stderr)
    state.wait_for_everyone()
    if shard.is_main:
        _write_score_report(args, samples, folder, bench, rub, embedder, config)
    return 0


def compare(args) -> int:
    if len(args.runs) < 2:
        raise ValueError("give two or more run folders to compare")
    check_int("--grid", args.grid, 0, 64)
    check_int("--cell", args.cell, 32, 2048)
    names = list(_split(args.names)) or None
    result = write_comparison(args.runs, args.out, names, grid_keys=list(_split(args.grid_keys)) or None,
                              grid_count=args.grid, cell=args.cell)
    print(result["markdown"])
    for p in result["paths"].values():
        print(p)
    return 0


def report(args) -> int:
    """``gie-eval report``: the HTML page of one or more scored runs."""
    check_int("--samples", args.samples, 0, None)
    check_int("--cell", args.cell, 32, 1024)
    if Path(args.out).suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out '{args.out}' must be an .html file")
    check_output_path(Path(args.out), "report")
    path = write_html_report(args.runs, args.out, list(_split(args.names)) or None, samples=args.samples, cell=args.cell)
    print(path)
    return 0


def _paper_namespaces(args, run, geometry: str) -> tuple[argparse.Namespace, argparse.Namespace]:
    """The generate and score commands of one paper run, as if typed (so they check, shard and
    record exactly as they do)."""
    gen = argparse.Namespace(**{
        **vars(args), "command": "generate", "benchmark": run.benchmark, "data": run.data, "out": str(run.folder),
        "images": run.images, "language": "en", "complexity": None, "image_type": None, "task_types": None,
        "geometry": geometry, "rewrite": run.variant == "rewritten",
    })
    sc = argparse.Namespace(
        command="score", run=str(run.folder), judge=args.judge, rubric=None, similarity=False, similarity_model=None,
        benchmark=None, data=None, images=None, language=None, complexity=None, image_type=None, task_types=None,
        limit=None, judge_max_new_tokens=args.judge_max_new_tokens, judge_samples=None,
        judge_max_pixels=args.judge_max_pixels, dtype=args.dtype, device=args.device, quiet=True,
    )
    return gen, sc


def _paper_tables(proto, runs, out: Path) -> str:
    """paper.md and paper.json from the runs' scores; returns the markdown."""
    tables, summary = [], {}
    for name, table in PAPER.items():
        mine = [r for r in runs if r.benchmark == name]
        if not mine:
            continue
        reports = {r.variant: load_scores(r.folder) for r in mine}
        judges = {rep.get("judge") for rep in reports.values()}
        tables.append((table, reports, judges))
        summary[name] = {"title": table.title, "comparability": comparability(table, proto, judges),
                         "columns": [c for c, _ in table.columns] + [table.overall], "rows": paper_rows(table, reports),
                         "runs": {r.variant: str(r.folder) for r in mine}}
    md = paper_markdown(proto, tables)
    atomic_write_text(out / "paper.md", md)
    atomic_write_text(out / "paper.json", json.dumps({"protocol": proto.name, "tables": summary}, indent=2) + "\n")
    return md


def paper(args) -> int:
    """``gie-eval paper``: every input checked before any weight is read, then generate and score
    each run (sharded as they shard), then the tables beside the published figures."""
    proto = protocol(args.protocol)
    geometry = args.geometry or proto.geometry
    out = Path(args.out)
    runs = plan_runs(proto, out, imgedit=args.imgedit, gedit=args.gedit, upstream=args.upstream,
                     variants=_split(args.variants))
    if args.limit is not None:
        check_int("--limit", args.limit, 0, None)
    check_judge(args.judge)
    check_judge_options(args.judge_max_new_tokens, args.judge_max_pixels)
    samples = {r.folder: load_samples(r.benchmark, r.data, SelectOptions(images=r.images, limit=args.limit or 0)) for r in runs}
    prompts = {r.folder: imgedit_prompts_file(proto, r, args.upstream) for r in runs if r.benchmark == "imgedit"}
    check_output_path(out / "paper.md", "paper table")
    shard, state = current_shard()
    for run in runs:  # every run's settings (a rewritten run needs the checkpoint's VLM) before any run starts
        _generate_settings(_paper_namespaces(args, run, geometry)[0], state, shard)
    if shard.is_main:
        print(f"{PROG} paper: protocol {proto.name}: {proto.title}; geometry {geometry}", file=sys.stderr)
    for run in runs:
        gen, sc = _paper_namespaces(args, run, geometry)
        generate(gen)
        score(sc)
        if shard.is_main and run.benchmark == "imgedit":
            imgedit_scorer_files(run, [s.key for s in samples[run.folder]], prompts[run.folder])
    state.wait_for_everyone()
    if shard.is_main:
        print(_paper_tables(proto, runs, out))
        print(out / "paper.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
