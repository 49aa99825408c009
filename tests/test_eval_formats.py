"""gie-eval's instruction sets and layouts: each benchmark's published on-disk form is read, its
outputs go where its own scorer looks, seeds and shards are fixed by the sample, not the run."""

from __future__ import annotations

import json
import re
import sys

import pytest

from gie_core.eval import synthetic
from gie_core.eval.benchmarks import BENCHMARKS, SelectOptions, benchmark, load_sample_image, load_samples
from gie_core.eval.generate import GenerateSettings, paper_output_size
from gie_core.eval.runs import Shard, sample_seed
from gie_core.eval.tables import InstructionSetError, read_json_rows


def _layout(name, samples):
    return [BENCHMARKS[name].output_path(s) for s in samples]


def test_imgedit_singleturn_json_and_its_flat_key_layout(tmp_path):
    path, images = synthetic.write_imgedit(tmp_path, n=3)
    samples = load_samples("imgedit", path, SelectOptions(images=str(images)))
    assert [s.key for s in samples] == ["100", "101", "102"]
    assert [s.category for s in samples] == ["add", "remove", "background"]
    assert samples[0].instruction == "Add a red hat to the man."
    assert load_sample_image(samples[1].image, "img").size == synthetic.SIZE
    assert _layout("imgedit", samples) == ["100.png", "101.png", "102.png"]
    elsewhere = tmp_path / "elsewhere.json"  # the JSON away from its images
    elsewhere.write_text(path.read_text())
    with pytest.raises(ValueError, match="does not exist"):  # images resolved against the JSON's folder by default
        load_sample_image(load_samples("imgedit", elsewhere)[0].image, "img")


def test_imgedit_reads_the_unpacked_benchmark_tar_as_it_is(tmp_path):
    """Benchmark.tar unpacks to Benchmark/singleturn/ holding singleturn.json beside judge_prompt.json
    and the image folders (the paths other projects' scripts read); the set is found from the
    JSON alone (images beside it), or from the unpacked folder, its Benchmark or singleturn folder."""
    path, images = synthetic.write_imgedit(tmp_path / "ImgEdit", n=3)
    assert path == tmp_path / "ImgEdit" / "Benchmark" / "singleturn" / "singleturn.json" and images == path.parent
    assert (images / "judge_prompt.json").is_file() and (images / "animal" / "000000001.jpg").is_file()
    for given in (path, tmp_path / "ImgEdit", tmp_path / "ImgEdit" / "Benchmark", images):
        samples = load_samples("imgedit", given)
        assert [s.key for s in samples] == ["100", "101", "102"], given
        assert load_sample_image(samples[1].image, "img").size == synthetic.SIZE
    with pytest.raises(InstructionSetError, match=r"has no Benchmark/singleturn/singleturn.json"):
        load_samples("imgedit", tmp_path)


def test_gedit_rows_keep_english_by_default_and_write_fullset_task_language(tmp_path):
    path = synthetic.write_gedit(tmp_path, n=4, fmt="jsonl")
    en = load_samples("gedit", path)
    assert [s.key for s in en] == ["g0000", "g0001", "g0002"]  # g0003 is Chinese
    every = load_samples("gedit", path, SelectOptions(language="all"))
    assert [s.language for s in every] == ["en", "en", "en", "cn"]
    assert _layout("gedit", every)[::3] == ["fullset/subject-add/en/g0000.png", "fullset/style_change/cn/g0003.png"]
    assert every[1].extra["intersection_exist"] is True
    assert every[0].reference is not None  # the judge compares with input_image, as GEdit's scorer does


def test_gedit_parquet_shards_with_embedded_images(tmp_path):
    pytest.importorskip("pyarrow")
    root = synthetic.write_gedit(tmp_path, n=4, fmt="parquet")
    samples = load_samples("gedit", root, SelectOptions(language="all"))  # the dataset folder: its shards
    assert len(samples) == 4 and isinstance(samples[0].image, bytes)
    assert load_sample_image(samples[0].image, "img").size == synthetic.SIZE


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    f = tmp_path / "train-00000-of-00001.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(InstructionSetError, match=r"pyarrow.*JSON and JSONL"):
        load_samples("gedit", f)


def test_complex_edit_image_folder_picks_the_level(tmp_path):
    root = synthetic.write_complex_edit(tmp_path, n=3)
    level8 = load_samples("complex-edit", root)
    level1 = load_samples("complex-edit", root, SelectOptions(complexity=1))
    assert [s.key for s in level8] == ["00000", "00001", "00002"]
    assert level1[0].instruction == "Add a red hat to the man."
    assert level8[0].instruction.count(", then ") == 7 and level8[0].category == "complexity-8"
    assert _layout("complex-edit", level8) == ["00000.png", "00001.png", "00002.png"]
    with pytest.raises(ValueError, match="complexity is 9"):
        load_samples("complex-edit", root, SelectOptions(complexity=9))


def test_omnicontext_keeps_single_tasks_and_writes_fullset_task(tmp_path):
    path = synthetic.write_omnicontext(tmp_path, n=2)
    samples = load_samples("omnicontext", path)
    assert [(s.key, s.category) for s in samples] == [("o0", "single_character"), ("o1", "single_object")]
    assert _layout("omnicontext", samples) == ["fullset/single_character/o0.png", "fullset/single_object/o1.png"]
    assert len(load_samples("omnicontext", path, SelectOptions(task_types=("all",)))) == 3


def test_own_jsonl_and_its_checks(tmp_path):
    path = synthetic.write_jsonl(tmp_path, n=3)
    samples = load_samples("jsonl", path, SelectOptions(limit=2))
    assert [(s.key, s.category) for s in samples] == [("s0", "local"), ("s1", "global")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": "../x", "image": "a.png", "instruction": "x"}) + "\n")
    with pytest.raises(InstructionSetError, match=r"key '\.\./x' cannot name an output file"):
        load_samples("jsonl", bad)
    bad.write_text("".join(json.dumps({"key": "a", "image": "a.png", "instruction": "x"}) + "\n" for _ in range(2)))
    with pytest.raises(InstructionSetError, match="appears twice"):
        load_samples("jsonl", bad)
    bad.write_text(json.dumps({"image": "a.png"}) + "\n")
    with pytest.raises(InstructionSetError, match="no 'instruction' field"):
        load_samples("jsonl", bad)
    bad.write_text("{not json\n")
    with pytest.raises(InstructionSetError, match=r"bad.jsonl:1 is not valid JSON"):
        load_samples("jsonl", bad)
    with pytest.raises(ValueError, match="benchmark 'nope' is unknown"):
        benchmark("nope")


def test_shards_cover_the_set_once_and_seeds_follow_the_key():
    items = list(range(11))
    parts = [Shard(i, 3).take(items) for i in range(3)]
    assert sorted(sum(parts, [])) == items and sum(len(p) for p in parts) == len(items)
    assert sample_seed(42, "a") == sample_seed(42, "a") != sample_seed(42, "b") != sample_seed(43, "b")
    assert 0 <= sample_seed(42, "a") < 2**64


def test_paper_geometry_is_the_nearest_kontext_ratio_at_one_megapixel():
    assert paper_output_size(512, 512) == (1024, 1024)
    assert paper_output_size(1500, 1000) == (1248, 832)  # 3:2 -> 48x32 x 26.1 -> floored to 16
    assert paper_output_size(1184, 880) == (1184, 880)  # 74:55 scaled to 1024^2 and floored
    assert paper_output_size(100, 300) == (656, 1552)  # 3:7 (672x1568) scaled to 1024^2: upstream never hit the bucket


def test_paper_geometry_settings_resolve_each_sample_request():
    from PIL import Image

    paper = GenerateSettings(mode="t5", steps=2, guidance=3.5, seed=42, geometry="paper", reference_resample="nearest")
    req = paper.request(Image.new("RGB", (300, 200)), "k")
    assert (req.width, req.height, req.reference_resample) == (1248, 832, "nearest")
    assert req.seed == sample_seed(42, "k")
    ours = GenerateSettings(mode="t5", steps=2, guidance=3.5, seed=42, width=64, height=0)
    assert (ours.request(Image.new("RGB", (300, 200)), "k").height) == 48  # one side follows the aspect
    with pytest.raises(ValueError, match="geometry"):
        GenerateSettings(mode="t5", steps=2, guidance=3.5, seed=42, geometry="mine").check()
    assert BENCHMARKS["complex-edit"].paper_input_size == (1024, 1024)  # upstream squashed Complex-Edit inputs


def _rewrite_rows(path, change):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    change(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("name, field, value", [
    ("gedit", "task_type", "../../../victim"),
    ("gedit", "task_type", "/tmp/victim"),
    ("gedit", "instruction_language", ".."),
    ("gedit", "instruction_language", "en/../../x"),
    ("omnicontext", "task_type", "../../../victim"),
    ("omnicontext", "task_type", "/abs/victim"),
    ("omnicontext", "key", "../victim"),
])
def test_a_row_whose_path_parts_leave_the_run_folder_is_refused_naming_it(tmp_path, name, field, value):
    """Task types and languages name folders of the run as keys name files: one rule refuses a
    traversal, an absolute path or a folder separator, naming the row, the field and the value."""
    path = synthetic.write_gedit(tmp_path, n=2) if name == "gedit" else synthetic.write_omnicontext(tmp_path, n=2)
    _rewrite_rows(path, lambda rows: rows[1].update({field: value}))
    what = "GEdit row 1" if name == "gedit" else "OmniContext row 1"
    with pytest.raises(InstructionSetError, match=rf"{what}: {field} '{re.escape(value)}' cannot name an output"):
        load_samples(name, path, SelectOptions(language="all", task_types=("all",)))
    with pytest.raises(InstructionSetError, match=rf"{what}: {field}"):  # filtered out or not: the set is refused
        load_samples(name, path)


def test_an_instruction_set_that_is_not_utf8_is_named_with_where(tmp_path):
    """An instruction set saved in another encoding is refused naming the file, line and byte, as every
    file a user writes is (gie_core.files.read_text), not with a bare codec error."""
    bad = tmp_path / "set.json"
    bad.write_bytes(b'[{"key": "a",\n  "instruction": "caf\xe9"}]')
    with pytest.raises(InstructionSetError, match=r"set\.json is not UTF-8 text: byte 0xe9 at line 2"):
        read_json_rows(bad)
    with pytest.raises(InstructionSetError, match="is a folder; give the JSON/JSONL/parquet file"):
        read_json_rows(tmp_path)
