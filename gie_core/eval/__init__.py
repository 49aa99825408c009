"""Benchmark harness: generate a benchmark's edits, judge them offline, compare runs (``gie-eval``).

- :mod:`gie_core.eval.benchmarks`: the instruction sets (ImgEdit-Bench, GEdit-Bench, Complex-Edit,
  OmniContext, plain JSONL) in their published on-disk forms, and where each benchmark's own
  scorer expects the outputs;
- :mod:`gie_core.eval.generate`: one edit per sample, sharded across processes, resumable,
  with a deterministic seed per sample and failures recorded, not fatal;
- :mod:`gie_core.eval.judge`: a local Qwen2.5-VL judge, this project's judging prompts and a
  robust parser of its answers;
- :mod:`gie_core.eval.metrics`: reference-free similarity to the source outside the edited region;
- :mod:`gie_core.eval.score` / :mod:`gie_core.eval.compare`: scores per category as JSON, CSV
  and markdown; several runs side by side, and a picture grid;
- :mod:`gie_core.eval.report`: one self-contained HTML page of scored runs (charts, samples worst first);
- :mod:`gie_core.eval.paper`: the published ImgEdit / GEdit protocol (its prompt files, its figures);
- :mod:`gie_core.eval.runs`: a run folder's records, the shard of this process, the seed of a sample;
- :mod:`gie_core.eval.synthetic`: tiny benchmark folders in each format, for trying it all offline.
"""
