"""The offline judge: answers parsed robustly (well-formed, partial, garbage), rubrics combined as
the benchmarks do, reports per category, similarity outside the edited region, and the judge
itself running on the tiny Qwen2.5-VL (a GPT-Image-Edit checkpoint and a stock folder)."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from gie_core.eval import synthetic
from gie_core.eval.benchmarks import BENCHMARKS, SelectOptions, load_samples
from gie_core.eval.judge import (
    RUBRICS,
    VIESCORE_PQ,
    VIESCORE_SC,
    QwenJudge,
    imgedit_question,
    judge_sample,
    load_judge,
    parse_scores,
)
from gie_core.eval.metrics import EmbeddingSimilarity, estimate_edited_mask, similarity_outside, to_array
from gie_core.eval.runs import RunFolder
from gie_core.eval.score import SIMILARITY_METRICS, aggregate, run_score, write_report

SC = ("editing_success", "over_editing")


# --------------------------------------------------------------------------------------------
# Parsing fixed answers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [
    '{"reasoning": "The hat is there.", "editing_success": 8, "over_editing": 6}',
    'Sure!\n```json\n{\n  "reasoning": "ok",\n  "Editing Success": "8",\n  "over-editing": 6,\n}\n```',
    "{'reasoning': 'fine', 'editing_success': 8, 'over_editing': 6}",
    "**Editing success:** 8/10\n**Over editing:** 6 out of 10\nThe hat looks pasted.",
    '{"score": [8, 6], "reasoning": "VIEScore style"}',
    '{"scores": {"editing_success": 8, "over_editing": 6}}',
    "editing_success = 8; over_editing is 6",
])
def test_well_formed_answers_in_many_shapes_parse(answer):
    parsed = parse_scores(answer, SC, 0, 10)
    assert parsed.status == "ok", parsed.problems
    assert parsed.values == {"editing_success": 8.0, "over_editing": 6.0}


def test_partial_out_of_range_and_garbage_answers_are_recorded_as_such():
    partial = parse_scores('{"editing_success": 7, "over_editing": "n/a"}', SC, 0, 10)
    assert partial.status == "partial" and partial.values == {"editing_success": 7.0, "over_editing": None}
    assert partial.problems == ["no score for over_editing"]
    out_of_range = parse_scores('{"editing_success": 12, "over_editing": 4}', SC, 0, 10)
    assert out_of_range.status == "partial" and out_of_range.values["editing_success"] is None
    assert "editing_success=12 is outside 0-10" in out_of_range.problems
    for garbage in (")\ufffdChange!om>ro\ufffdowlorky", "", "I cannot judge these images. 8 apples.", "{broken"):
        g = parse_scores(garbage, SC, 0, 10)
        assert g.status == "unparseable" and g.values == {"editing_success": None, "over_editing": None}
    assert parse_scores('{"instruction_compliance": 4, "visual_naturalness": 5, "detail_coherence": 3}',
                        imgedit_question("add").criteria, 1, 5).status == "ok"
    assert parse_scores('{"instruction_compliance": 0}', imgedit_question("add").criteria, 1, 5).status == "unparseable"


PF = ("prompt_following",)  # a one-criterion question (OmniContext's)


@pytest.mark.parametrize("answer, criteria, expected", [
    ("[8, 9]", SC, (8, 9)),  # VIEScore's own utils accept a bare list
    ("The edit adds the hat; nothing else moved.\n```\n[8, 9]\n```", SC, (8, 9)),
    ("Score: 4", PF, (4,)),
    ('{"score": 7}', PF, (7,)),
    ('{"reasoning": "the scene matches", "score": 7}', PF, (7,)),
    ("editing_success (0-10): 7\nover_editing (0-10): 5", SC, (7, 5)),
    ("Editing success [0-10]: 7, over editing (0 to 10) = 5", SC, (7, 5)),
], ids=["bare-list", "bare-list-fenced", "score-label", "score-json", "score-json-reasoning", "scale-label",
        "scale-label-brackets"])
def test_the_answer_forms_of_the_benchmarks_own_parsers_are_read(answer, criteria, expected):
    parsed = parse_scores(answer, criteria, 0, 10)
    assert parsed.status == "ok", parsed.problems
    assert parsed.values == dict(zip(criteria, map(float, expected)))


def test_lookalikes_of_those_forms_stay_unparseable():
    """A list inside a sentence is a scale, not scores; a lone "Score" with several criteria, or a
    list of the wrong length, says nothing about which criterion is which."""
    for answer, criteria in [("Scores are on the scale [0, 10].", SC), ("Score: 4", SC), ("[8, 9, 7]", SC),
                             ("[8, 9]", PF), ('{"score": 7}', SC)]:
        parsed = parse_scores(answer, criteria, 0, 10)
        assert parsed.status == "unparseable" and set(parsed.values.values()) == {None}, answer


def test_an_unparseable_answer_is_recorded_as_such_never_scored_zero(tmp_path):
    samples, folder = _run_with_copied_outputs(tmp_path, n=2)  # s0 local, s1 global
    judge = ScriptedJudge([
        "[8, 9]", "naturalness (0-10): 9\nartifacts (0-10): 7",  # s0: ok
        "I am unable to score these images.", "The scale is [0, 10].",  # s1: nothing readable
    ])
    run_score(samples, BENCHMARKS["jsonl"], folder, judge=judge, rub=RUBRICS["viescore"], progress=False)
    recs = {r["key"]: r for r in folder.read_records("judgements")}
    assert recs["s0"]["status"] == "ok" and recs["s0"]["metrics"]["overall"] == pytest.approx(math.sqrt(8 * 7))
    assert recs["s1"]["status"] == "unparseable"
    assert recs["s1"]["metrics"] == {"semantics": None, "quality": None, "overall": None}
    assert recs["s1"]["answers"]["quality"]["raw"] == "The scale is [0, 10]."
    report = aggregate(samples, folder.read_records("judgements"), list(RUBRICS["viescore"].metrics))
    assert report["counts"]["unparseable"] == 1 and report["categories"]["global"]["overall"] is None
    assert report["categories"]["global"]["overall_n"] == 0  # counted as unparseable, not as a 0
    assert report["sample_mean"]["overall"] == pytest.approx(math.sqrt(8 * 7))  # the mean of s0 alone, no 0 mixed in


def test_rubrics_combine_as_the_benchmarks_do():
    v = RUBRICS["viescore"].combine({"editing_success": 9, "over_editing": 4, "naturalness": 8, "artifacts": 9})
    assert v == {"semantics": 4, "quality": 8, "overall": pytest.approx(math.sqrt(32))}
    assert RUBRICS["viescore"].combine({"editing_success": 9, "over_editing": None, "naturalness": 8, "artifacts": 9})["overall"] is None
    assert RUBRICS["imgedit"].combine({"a": 5, "b": 4, "c": 3}) == {"overall": 4}
    assert RUBRICS["complex-edit"].combine({"instruction_following": 6, "identity_preservation": 9, "perceptual_quality": 9})["overall"] == 8
    assert RUBRICS["omnicontext"].combine({"prompt_following": 4, "subject_consistency": 9})["overall"] == pytest.approx(6)
    style, unknown = imgedit_question("style"), imgedit_question("hybrid")
    assert [c.name for c in style.criteria] == ["style_fidelity", "content_preservation", "rendering_quality"]
    assert [c.name for c in unknown.criteria] == ["instruction_compliance", "visual_quality", "detail_preservation"]
    prompt = VIESCORE_SC.prompt("make it {snowy}")
    assert '"make it {snowy}"' in prompt and '"editing_success": <integer 0-10>' in prompt
    assert VIESCORE_PQ.images == ("output",) and VIESCORE_SC.images == ("source", "output")


# --------------------------------------------------------------------------------------------
# Reports from fixed answers
# --------------------------------------------------------------------------------------------


class ScriptedJudge:
    """Fixed answers, in the order the questions are asked."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def answer(self, images, prompt):
        self.calls.append((len(images), prompt))
        return self.answers.pop(0) if self.answers else "no idea"


def _run_with_copied_outputs(tmp_path, n=4):
    """A jsonl run folder whose outputs are the sources themselves (no model needed)."""
    path = synthetic.write_jsonl(tmp_path / "set", n=n)
    samples = load_samples("jsonl", path)
    folder = RunFolder(tmp_path / "run")
    for s in samples:
        out = folder.root / BENCHMARKS["jsonl"].output_path(s)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(s.image, out)
    return samples, folder


def test_scores_per_category_and_overall_as_json_csv_markdown(tmp_path):
    samples, folder = _run_with_copied_outputs(tmp_path, n=4)  # s0, s2 local; s1, s3 global
    judge = ScriptedJudge([
        '{"editing_success": 8, "over_editing": 6}', '{"naturalness": 9, "artifacts": 9}',  # s0
        '{"editing_success": 4, "over_editing": 9}', '{"naturalness": 4, "artifacts": 8}',  # s1
        '{"editing_success": 10, "over_editing": 10}', '{"naturalness": "ten"}',  # s2: partial -> no quality
        "garbage", "garbage",  # s3, judged on the rerun
    ])
    (folder.root / "s3.png").unlink()  # one output never made
    rub = RUBRICS["viescore"]
    summary = run_score(samples, BENCHMARKS["jsonl"], folder, judge=judge, rub=rub, similarity=True, progress=False)
    assert (summary.judged, summary.missing) == (3, 1)
    assert [n for n, _ in judge.calls] == [2, 1] * 3  # source+output for semantics, output alone for quality
    assert samples[0].instruction in judge.calls[0][1]
    recs = {r["key"]: r for r in folder.read_records("judgements")}
    assert recs["s2"]["status"] == "partial" and recs["s3"]["status"] == "missing_output"
    assert recs["s0"]["answers"]["semantics"]["raw"] == '{"editing_success": 8, "over_editing": 6}'
    # identical output and source: nothing counted as edited, PSNR capped, SSIM 1
    assert recs["s0"]["similarity"] == {"psnr_outside": 100.0, "ssim_outside": pytest.approx(1.0), "edited_fraction": 0.0}

    report = aggregate(samples, folder.read_records("judgements"), [*rub.metrics, *SIMILARITY_METRICS], {"title": "t"})
    local, glob = report["categories"]["local"], report["categories"]["global"]
    assert (local["n"], local["semantics"], local["quality"], local["overall"]) == (2, 8.0, 9.0, pytest.approx(math.sqrt(6 * 9)))
    assert (glob["n"], glob["semantics"], glob["overall"]) == (1, 4.0, pytest.approx(math.sqrt(16)))
    assert report["overall"]["semantics"] == pytest.approx((8 + 4) / 2)  # mean of the category means
    assert report["sample_mean"]["semantics"] == pytest.approx((6 + 4 + 10) / 3)
    assert report["counts"] | {} == {"samples": 4, "judged": 3, "ok": 2, "partial": 1, "unparseable": 0, "failed": 0,
                                     "missing_output": 1, "not_scored": 0}
    paths = write_report(folder, report)
    assert json.loads(paths[0].read_text())["overall"]["semantics"] == 6.0
    rows = list(csv.reader(paths[1].read_text().splitlines()))
    assert rows[0] == ["category", "n", "semantics", "quality", "overall", *SIMILARITY_METRICS]
    assert rows[-1][:3] == ["overall", "3", "6.0000"]
    md = paths[2].read_text()
    assert "| local | 2 | 8.000 | 9.000 | 7.348 |" in md and "missing output 1" in md

    # a rerun judges only what is not judged yet (the output that now exists)
    shutil.copy(samples[3].image, folder.root / "s3.png")
    again = run_score(samples, BENCHMARKS["jsonl"], folder, judge=judge, rub=rub, similarity=True, progress=False)
    assert (again.done_before, again.judged) == (3, 1)
    assert {r["key"]: r for r in folder.read_records("judgements")}["s3"]["status"] == "unparseable"


# --------------------------------------------------------------------------------------------
# Similarity outside the edited region
# --------------------------------------------------------------------------------------------


def test_edited_region_is_found_and_left_out_of_the_similarity():
    rng = np.random.RandomState(0)
    src = (rng.rand(64, 96, 3) * 255).astype(np.uint8)
    out = src.copy()
    out[16:40, 32:64] = 255 - out[16:40, 32:64]  # the edit
    out = np.clip(out.astype(int) + rng.randint(-2, 3, out.shape), 0, 255).astype(np.uint8)  # faint drift elsewhere
    source, output = Image.fromarray(src), Image.fromarray(out)
    edited = estimate_edited_mask(to_array(source), to_array(output))
    assert bool(edited[16:40, 32:64].all()) and not bool(edited[:, :16].any())
    metrics, keep = similarity_outside(source, output)
    assert 0.1 < metrics["edited_fraction"] < 0.4
    assert 40 < metrics["psnr_outside"] < 100 and metrics["ssim_outside"] > 0.9
    mask = Image.new("L", (96, 64))
    mask.paste(255, (32, 16, 64, 40))
    import io

    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    given, _ = similarity_outside(source, output, buf.getvalue())
    assert given["edited_fraction"] == pytest.approx(24 * 32 / (64 * 96))
    assert given["psnr_outside"] > 40


def test_embedding_similarity_from_a_vision_model_folder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(tmp_path / "dino")
    sim = EmbeddingSimilarity.from_path(tmp_path / "dino")
    a, b = synthetic.picture(0), synthetic.picture(3)
    keep = torch.ones(a.height, a.width, dtype=torch.bool)
    assert sim.cosine_outside(a, a, keep) == pytest.approx(1.0, abs=1e-5)
    assert sim.cosine_outside(a, b, keep) < 0.9999
    with pytest.raises(ValueError, match="config.json"):
        EmbeddingSimilarity.from_path(tmp_path)


def test_embedding_similarity_reads_safetensors_weights_only(tmp_path):
    """A similarity model whose weights are only a pickled pytorch_model.bin is refused, named:
    weights are read from safetensors only."""
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8))
    model.config.save_pretrained(tmp_path / "dino")
    torch.save(model.state_dict(), tmp_path / "dino" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="could not load the similarity model"):
        EmbeddingSimilarity.from_path(tmp_path / "dino")


# --------------------------------------------------------------------------------------------
# The judge on the tiny Qwen2.5-VL
# --------------------------------------------------------------------------------------------


def test_tiny_qwen_judge_sees_both_images_and_its_garbage_is_recorded(gie_dir):
    judge = load_judge(gie_dir, dtype="fp32", device="cpu", max_new_tokens=8, max_pixels=56 * 56)
    a, b = synthetic.picture(0), synthetic.picture(1).resize((64, 40))
    enc = judge.inputs([a, b], VIESCORE_SC.prompt("add a hat"))
    per_image = (enc["image_grid_thw"].prod(-1) // 4).tolist()
    assert len(per_image) == 2 and int((enc["input_ids"] == judge.encoder.image_token_id).sum()) == sum(per_image)
    first = judge.answer([a, b], VIESCORE_SC.prompt("add a hat"))
    assert isinstance(first, str) and first == judge.answer([a, b], VIESCORE_SC.prompt("add a hat"))  # greedy
    sample = load_samples("jsonl", synthetic.write_jsonl(gie_dir.parent / "judge_set", n=1))[0]
    record = judge_sample(judge, RUBRICS["imgedit"], sample, a, b)
    assert record["status"] in ("unparseable", "partial", "ok")  # random weights: almost surely unparseable
    answer = next(iter(record["answers"].values()))
    assert answer["raw"] is not None and set(answer["values"]) == {"instruction_compliance", "visual_quality", "detail_preservation"}


def test_stock_qwen_folder_loads_as_judge(tmp_path, gie_dir):
    """A Qwen2.5-VL folder as transformers saves it (a user's 7B/72B) works as well as the checkpoint's."""
    ck = load_judge(gie_dir, dtype="fp32", device="cpu", max_new_tokens=4)
    img = synthetic.picture(2)
    expected = ck.answer([img], VIESCORE_PQ.prompt("x"))  # generating reads the output head, so it is saved too
    stock = tmp_path / "qwen"
    ck.encoder.model.save_pretrained(stock)
    for f in gie_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template", "preprocessor")):
            shutil.copy(f, stock / f.name)
    judge = load_judge(stock, dtype="fp32", device="cpu", max_new_tokens=4)
    assert isinstance(judge, QwenJudge)
    assert judge.answer([img], VIESCORE_PQ.prompt("x")) == expected
    with pytest.raises(ValueError, match="no config.json"):
        load_judge(tmp_path)


def test_gedit_reports_its_intersection_subset_averaged_as_upstream_does(tmp_path):
    # (task_type, Intersection_exist, semantics, quality); overall = sqrt(semantics x quality) per sample
    table = [
        ("subject-add", True, 8, 2),  # overall 4
        ("subject-add", False, 4, 9),  # overall 6
        ("subject-add", True, 9, 1),  # overall 3
        ("style_change", True, 2, 8),  # overall 4
        ("style_change", False, 10, 10),  # overall 10
        ("style_change", True, None, None),  # unparseable: counted, in no mean
        ("tone_transfer", False, 5, 5),  # overall 5; no Intersection row in this category
    ]
    rows = synthetic.gedit_rows(len(table), embed=False, root=tmp_path)
    for row, (task, inter, _, _) in zip(rows, table):
        row.update(task_type=task, Intersection_exist=inter, instruction_language="en")
    path = tmp_path / "gedit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_samples("gedit", path)
    records = []
    for s, (_, _, sem, q) in zip(samples, table):
        overall = None if sem is None else math.sqrt(sem * q)
        records.append({"key": s.key, "status": "ok" if sem is not None else "unparseable",
                        "metrics": {"semantics": sem, "quality": q, "overall": overall}})
    bench = BENCHMARKS["gedit"]
    report = aggregate(samples, records, list(RUBRICS["viescore"].metrics), subsets=bench.subsets)

    # the whole set: category means, then their mean
    assert report["categories"]["subject-add"]["semantics"] == pytest.approx((8 + 4 + 9) / 3)
    assert report["overall"]["overall"] == pytest.approx(((4 + 6 + 3) / 3 + (4 + 10) / 2 + 5) / 3)
    # Intersection (calculate_statistics.py): the flagged rows alone, per category, then the mean of the
    # categories that have any; by hand: subject-add 8.5 / 1.5 / 3.5, style_change 2 / 8 / 4
    inter = report["subsets"]["intersection"]
    assert inter["samples"] == 4 and list(inter["categories"]) == ["subject-add", "style_change"]
    assert (inter["categories"]["subject-add"]["n"], inter["categories"]["style_change"]["n"]) == (2, 2)  # judged
    assert inter["categories"]["style_change"]["semantics_n"] == 1  # the unparseable row is not a 0
    assert inter["overall"] == {"semantics": pytest.approx(5.25), "quality": pytest.approx(4.75),
                                "overall": pytest.approx(3.75)}
    assert inter["sample_mean"]["semantics"] == pytest.approx((8 + 9 + 2) / 3)

    paths = write_report(RunFolder(tmp_path / "run"), report)
    rows_csv = list(csv.reader(paths[1].read_text().splitlines()))
    assert ["intersection/overall", "4", "5.2500", "4.7500", "3.7500"] in rows_csv
    assert ["overall", "7", *(f"{v:.4f}" for v in (report["overall"][m] for m in ("semantics", "quality", "overall")))] in rows_csv
    md = paths[2].read_text()
    assert "## intersection (4 samples)" in md and "| **average intersection** (mean of categories) | 4 | 5.250 | 4.750 | 3.750 |" in md
    assert "subsets" not in aggregate(samples, records, ["semantics"])  # other benchmarks: no subset table


# --------------------------------------------------------------------------------------------
# Repeated judge samples (Complex-Edit)
# --------------------------------------------------------------------------------------------


def test_complex_edit_averages_its_repeated_judge_samples_as_upstream_does(tmp_path):
    """Complex-Edit's eval.py asks each question -n 20 times by default; each criterion is the mean of
    the answers (its dict_mean over the runs), and a sample's overall the mean of those means. An
    answer that cannot be read is left out of its criterion's mean, never counted as 0."""
    assert RUBRICS["complex-edit"].samples == 20 and RUBRICS["viescore"].samples == 1
    samples, folder = _run_with_copied_outputs(tmp_path, n=1)
    judge = ScriptedJudge([
        '{"instruction_following": 6, "identity_preservation": 9}',
        '{"instruction_following": 8, "identity_preservation": 9}',
        '{"instruction_following": 10, "identity_preservation": 6}',
        "I cannot tell.",  # the 4th alignment answer: unreadable
        '{"perceptual_quality": 7}', '{"perceptual_quality": 8}', "Score: 9", '{"perceptual_quality": 8}',
    ])
    run_score(samples, BENCHMARKS["jsonl"], folder, judge=judge, rub=RUBRICS["complex-edit"], judge_samples=4,
              progress=False)
    assert [n for n, _ in judge.calls] == [2] * 4 + [1] * 4
    rec = folder.read_records("judgements")[0]
    assert rec["status"] == "partial" and rec["answers"]["alignment"]["status"] == "partial"
    assert rec["answers"]["quality"]["status"] == "ok" and len(rec["answers"]["quality"]["raw"]) == 4
    assert rec["answers"]["alignment"]["runs"][3] == {"instruction_following": None, "identity_preservation": None}
    m = rec["metrics"]
    assert (m["instruction_following"], m["identity_preservation"], m["perceptual_quality"]) == (8, 8, 8)
    assert m["overall"] == 8

    # the default: the rubric's 20 answers per question
    samples, folder = _run_with_copied_outputs(tmp_path / "default", n=1)
    judge = ScriptedJudge(['{"instruction_following": 5, "identity_preservation": 7}'] * 20 + ['{"perceptual_quality": 6}'] * 20)
    run_score(samples, BENCHMARKS["jsonl"], folder, judge=judge, rub=RUBRICS["complex-edit"], progress=False)
    assert len(judge.calls) == 40 and folder.read_records("judgements")[0]["metrics"]["overall"] == 6


def test_tiny_qwen_judge_samples_are_seeded_and_asked_in_calls_of_five(gie_dir):
    judge = load_judge(gie_dir, dtype="fp32", device="cpu", max_new_tokens=4, max_pixels=56 * 56)
    img, prompt = synthetic.picture(3), VIESCORE_PQ.prompt("x")
    first = judge.answer_samples([img], prompt, 7, seed=11)
    assert len(first) == 7 and all(isinstance(a, str) for a in first)
    assert judge.answer_samples([img], prompt, 7, seed=11) == first  # the same seed: the same answers
    assert judge.answer_samples([img], prompt, 7, seed=12) != first  # sampled, not greedy
    greedy = judge.answer([img], prompt)
    assert judge.answer([img], prompt) == greedy  # sampling left the greedy answer alone


def test_omnicontext_multi_image_samples_show_the_judge_every_input(tmp_path):
    """OmniContext's MULTIPLE/SCENE samples are judged on all their input images, in order, then the
    output (OmniContext's own scorer compares the output with every input); a one-image sample keeps
    the subject question pair over Image 1 and the output."""
    (tmp_path / "images").mkdir()
    sizes = {"0.png": (48, 40), "1.png": (32, 24), "2.png": (40, 40)}
    for name, size in sizes.items():
        Image.new("RGB", size, (len(name) * 40, 90, 20)).save(tmp_path / "images" / name)
    data = tmp_path / "omni.jsonl"
    rows = [{"key": "m0", "task_type": "multiple_object", "instruction": "Put both on a table.",
             "instruction_language": "en", "input_images": ["images/0.png", "images/1.png"]},
            {"key": "s0", "task_type": "single_character", "instruction": "She reads a book.",
             "instruction_language": "en", "input_images": ["images/2.png"]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_samples("omnicontext", data, SelectOptions(task_types=("all",)))
    folder = RunFolder(tmp_path / "run")
    for s in samples:
        out = folder.root / BENCHMARKS["omnicontext"].output_path(s)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (1, 2, 3)).save(out)

    class SeeingJudge(ScriptedJudge):
        def answer(self, images, prompt):
            self.calls.append(([im.size for im in images], prompt))
            return '{"reasoning": "ok", "prompt_following": 7, "subject_consistency": 6}'

    judge = SeeingJudge([])
    run_score(samples, BENCHMARKS["omnicontext"], folder, judge=judge, rub=RUBRICS["omnicontext"], progress=False)
    seen = {text: shown for shown, prompt in judge.calls for text in ("Put both on a table.", "She reads a book.")
            if text in prompt}
    assert seen["Put both on a table."] == [(48, 40), (32, 24), (64, 48)]  # Image 1, Image 2, the output
    assert seen["She reads a book."] == [(40, 40), (64, 48)]
    multi = [p for shown, p in judge.calls if len(shown) == 3]
    assert len(multi) == 2 and all(p.startswith("The first images show the subjects") for p in multi)
    recs = {r["key"]: r for r in folder.read_records("judgements")}
    assert recs["m0"]["metrics"]["prompt_following"] == 7 and recs["m0"]["status"] == "ok"
