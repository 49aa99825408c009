"""Trainer options, data reading, buckets, region weights and checkpoint folders (no models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gie_core.train import checkpoint as ckpt
from gie_core.train.config import ConfigError, TrainConfig, load_config, read_config_file
from gie_core.train.data import (
    BucketBatches,
    DataError,
    EditDataset,
    ProblemLog,
    bucket_for,
    bucket_size,
    collate,
    connected_components,
    fit_to_bucket,
    read_data_txt,
    read_dataset,
    region_weight_map,
    scan_sizes,
)

ROOT = Path(__file__).resolve().parents[1]


def noise_image(w, h, seed=0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


# --- options ---------------------------------------------------------------------------------


def test_stage_configs_parse_and_hold_the_released_values():
    s1 = load_config(ROOT / "training/stage1.yaml", for_training=False)
    assert (s1.train.stage, s1.trainable_set, s1.optim.optimizer, s1.learning_rate) == (1, "connector", "adamw", 1e-3)
    assert s1.optim.betas == [0.9, 0.99] and s1.optim.ema_decay == 0.999 and s1.data.resolution == 512
    assert s1.model.mode == "vlm" and s1.train.guidance == 1.0
    s2 = load_config(ROOT / "training/stage2.yaml", for_training=False)
    assert (s2.train.stage, s2.trainable_set, s2.learning_rate) == (2, "image_attention", 1e-6)
    assert s2.use_gradient_checkpointing and s2.data.resolution == 1024 and s2.checkpoint.every == 5000
    for name in ("accelerate_deepspeed_zero2.yaml", "accelerate_fsdp.yaml"):
        acc = yaml.safe_load((ROOT / "training" / name).read_text())
        assert acc["distributed_type"] in ("DEEPSPEED", "FSDP") and acc["mixed_precision"] == "bf16"
    assert read_data_txt  # data.example.txt is documentation; its paths do not exist here
    assert "image_root,annotation_json,region_weighting" in (ROOT / "training/data.example.txt").read_text()


def test_wrong_config_key_fails_at_start_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown option 'optim\.lrr' in .*bad\.yaml; did you mean 'optim\.lr'"):
        load_config(bad, for_training=False)
    bad.write_text("traing:\n  stage: 2\n")
    with pytest.raises(ConfigError, match="unknown option 'traing'"):
        load_config(bad, for_training=False)
    with pytest.raises(ConfigError, match="optim.lr in overrides is 'fast' but must be a number"):
        load_config(overrides={"optim.lr": "fast"}, for_training=False)
    with pytest.raises(ConfigError, match="stage 1 trains only the connector"):
        load_config(overrides={"train.trainable": "lora"}, for_training=False)


def test_command_line_overrides_file_and_names_unknown_flags(tmp_path, capsys):
    from gie_core.cli.train import main

    f = tmp_path / "c.toml"
    f.write_text('[optim]\nlr = 0.5\n[train]\nmax_steps = 7\n')
    assert read_config_file(f)["optim"]["lr"] == 0.5
    cfg = load_config(f, overrides={"optim.lr": "1e-4"}, for_training=False)
    assert cfg.optim.lr == 1e-4 and cfg.train.max_steps == 7

    from gie_core.cli.train import build_parser
    from gie_core.train.config import config_from_args

    args = build_parser("train").parse_args(["--config", str(f), "--optim.lr", "2e-4", "--set", "train.max_steps=9",
                                             "--data.bucketing", "square", "--train.layers", "0,2",
                                             "--validation.steps", "3", "--export.dtype", "fp16"])
    cfg = config_from_args(args, for_training=False)
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.data.bucketing, cfg.train.layers) == (2e-4, 9, "square", [0, 2])
    assert (cfg.validation.steps, cfg.export.dtype) == (3, "fp16")
    args = build_parser("train").parse_args(["--train.max-steps", "5", "--output-dir", "runs/x"])  # dashes too
    cfg = config_from_args(args, for_training=False)
    assert (cfg.train.max_steps, cfg.output_dir) == (5, "runs/x")

    with pytest.raises(SystemExit) as exc:
        main(["--config", str(f), "--train.max_step", "3"])  # a prefix is never taken for the option
    assert exc.value.code == 2
    assert "--train.max_step" in capsys.readouterr().err


@pytest.mark.parametrize("flag, meant", [
    ("--steps", ["--validation.steps", "--train.max_steps"]),
    ("--dtype", ["--export.dtype", "--data.cache_dtype"]),
    ("--transformer", ["--export.transformer", "--model.init_transformer"]),
    ("--lr", ["--optim.lr"]),
    ("--validation.step", ["--validation.steps"]),
])
def test_short_or_partial_flags_are_refused_naming_the_real_options(flag, meant, tmp_path, capsys):
    """``--steps 3`` used to set validation.steps silently (a unique last part got a short flag)."""
    from gie_core.cli.train import build_parser, main

    for argv in ([flag, "3"], [f"{flag}=3"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"unknown option '{flag}'" in err and "full dotted name" in err, err
        assert all(m in err for m in meant), err
    parser = build_parser("train")
    assert parser.allow_abbrev is False
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--steps", "--dtype", "--transformer", "--lr", "--max-steps"}.isdisjoint(flags)
    assert {"--validation.steps", "--train.max_steps", "--train.max-steps", "--export.dtype"} <= flags


# --- data ------------------------------------------------------------------------------------


def write_pairs(root: Path, sizes, name="ann.json", jsonl=False, card=False) -> list[dict]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for i, (w, h) in enumerate(sizes):
        src = noise_image(w, h, i)
        tgt = np.asarray(src).copy()
        tgt[: h // 2, : w // 2] = 255 - tgt[: h // 2, : w // 2]
        src.save(root / f"img/s{i}.png")
        Image.fromarray(tgt).save(root / f"img/t{i}.png")
        if card:
            recs.append({"id": i, "input": f"img/s{i}.png", "output": f"img/t{i}.png", "instruction": f"invert corner {i}"})
        else:
            recs.append({"image": [f"img/s{i}.png", f"img/t{i}.png"],
                         "conversations": [{"from": "human", "value": f"<image>\ninvert corner {i}"}, {"from": "gpt", "value": "<gen_image>"}]})
    if jsonl:
        (root / name).write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    else:
        (root / name).write_text(json.dumps(recs))
    return recs


def test_both_annotation_schemas_and_data_txt(tmp_path):
    write_pairs(tmp_path / "a", [(64, 64)])
    write_pairs(tmp_path / "b", [(96, 64)], name="card.jsonl", jsonl=True, card=True)
    (tmp_path / "data.txt").write_text("# comment\na,a/ann.json,false\n\nb,b/card.jsonl,true\n")
    problems = ProblemLog()
    recs = read_dataset(tmp_path / "data.txt", problems)
    assert problems.total == 0
    assert [r.instruction for r in recs] == ["invert corner 0", "invert corner 0"]
    assert recs[0].source == tmp_path / "a/img/s0.png" and recs[1].target == tmp_path / "b/img/t0.png"
    assert [r.region_weighting for r in recs] == [False, True]
    assert [r.region_weighting for r in read_dataset(tmp_path / "data.txt", problems, "off")] == [False, False]
    (tmp_path / "bad.txt").write_text("a,a/ann.json,maybe\n")
    with pytest.raises(DataError, match="bad.txt:1: region_weighting is 'maybe'"):
        read_data_txt(tmp_path / "bad.txt")
    (tmp_path / "bad.txt").write_text("a,missing.json,true\n")
    with pytest.raises(DataError, match="missing.json does not exist"):
        read_data_txt(tmp_path / "bad.txt")


def test_bad_samples_are_reported_and_skipped(tmp_path):
    recs = write_pairs(tmp_path, [(64, 64)] * 4, jsonl=True)
    lines = (tmp_path / "ann.json").read_text().splitlines()
    lines.insert(1, '{"image": ["img/s0.png", "img/t0.png"], "conversations": [')  # malformed JSON line
    lines.append(json.dumps({"image": ["img/s9.png"], "conversations": []}))  # one image only
    (tmp_path / "ann.json").write_text("\n".join(lines))
    (tmp_path / "img/t1.png").unlink()  # missing file
    (tmp_path / "img/s2.png").write_bytes(b"not an image at all")  # corrupt file
    (tmp_path / "data.txt").write_text(f"{tmp_path},{tmp_path}/ann.json,false\n")
    problems = ProblemLog()
    records = read_dataset(tmp_path / "data.txt", problems)
    assert len(records) == 4 and problems.counts["malformed record"] == 2
    sizes = scan_sizes(records, problems, tmp_path / "index")
    assert [s is not None for s in sizes] == [True, False, False, True]
    assert problems.counts["missing image"] == 1 and problems.counts["unreadable image"] == 1
    assert "skipped 4 bad samples" in problems.summary()
    again = ProblemLog()
    assert scan_sizes(records, again, tmp_path / "index") == sizes and again.total == 2  # from the index file

    # square bucketing skips the header scan: bad pairs are found (and replaced) at load time
    ds = EditDataset(records, [(64, 64)] * 4, bucketing="square")
    item = ds[1]
    assert item["index"] == 2 or item["index"] == 3
    assert {b[0] for b in item["bad"]} >= {"missing image"}
    batch = collate([ds[0], ds[3]])
    assert batch["source"].shape == (2, 3, 64, 64) and batch["region_weight"] is None
    assert batch["source"].min() >= -1 and batch["source"].max() <= 1
    assert batch["qwen_image"][0].size == (448, 448)
    assert len(recs) == 4


# --- buckets ---------------------------------------------------------------------------------


def test_buckets_are_the_data_ratios_at_the_training_area():
    assert bucket_size((1, 1), 512) == (512, 512)
    assert bucket_size((3, 2), 512) == (624, 416) and bucket_size((2, 3), 512) == (416, 624)
    assert bucket_size((3, 2), 1024) == (1248, 832)
    assert bucket_for(1536, 1024, "ratio", 1024) == (1248, 832)
    assert bucket_for(1000, 1010, "ratio", 512) == (512, 512)
    assert bucket_for(1536, 1024, "square", 512) == (512, 512)
    img = noise_image(150, 100)
    assert fit_to_bucket(img, 624, 416, "ratio").size == (624, 416)
    squashed = fit_to_bucket(img, 64, 64, "square")
    assert squashed.size == (64, 64)
    # ratio mode keeps the aspect (a centre crop), square squashes: they differ on a 3:2 image
    assert not np.array_equal(np.asarray(fit_to_bucket(img, 64, 64, "ratio")), np.asarray(squashed))


def test_bucket_batches_are_deterministic_single_bucket_and_split_across_processes():
    buckets = [(64, 64)] * 5 + [(96, 64)] * 3
    b = BucketBatches(buckets, 2, seed=1)
    e0 = b.epoch(0)
    assert e0 == BucketBatches(buckets, 2, seed=1).epoch(0) and e0 != b.epoch(1)
    assert sorted(i for batch in e0 for i in batch) == list(range(8))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in e0)
    # two processes with batch 1 train exactly the global batches of one process with batch 2,
    # each a contiguous part; a batch of one pair reaches one process, the other loads a stand-in
    # that counts zero, so every process steps and the averaged gradient is the batch's
    r0, r1 = (BucketBatches(buckets, 1, seed=1, num_replicas=2, rank=k).shards(0) for k in (0, 1))
    assert len(r0) == len(r1) == len(e0) == 5
    assert [a.indices[:a.real] + b.indices[:b.real] for a, b in zip(r0, r1)] == e0
    assert all(a.offset == 0 and (b.offset == a.real or b.real == 0) for a, b in zip(r0, r1))
    singles = [(a, b) for a, b in zip(r0, r1) if a.total == 1]
    assert singles and all(b.real == 0 and b.indices == a.indices and b.loss_scale == 0 for a, b in singles)
    assert all(a.loss_scale + b.loss_scale == 2 for a, b in zip(r0, r1))
    assert not {i for x in r0 for i in x.indices[:x.real]} & {i for x in r1 for i in x.indices[:x.real]}


# --- region weights --------------------------------------------------------------------------


def test_region_weight_is_log_scheme_on_the_changed_region():
    src = np.full((128, 128, 3), 100, np.uint8)
    tgt = src.copy()
    tgt[48:80, 56:72] = 200  # a 32x16 changed block -> 4x2 of the 16x16 latents
    tgt[2, 120] = 255  # a speck: dropped as a small component
    w = region_weight_map(Image.fromarray(src), Image.fromarray(tgt))
    assert w.shape == (1, 16, 16)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[6:10, 7:9] = True
    expected = round(math.log2(256 / 8) + 1, 6)
    assert torch.allclose(w[0][inside], torch.tensor(expected)) and torch.all(w[0][~inside] == 1)
    assert torch.all(region_weight_map(Image.fromarray(src), Image.fromarray(src)) == 1)  # nothing changed
    exp = region_weight_map(Image.fromarray(src), Image.fromarray(tgt), "exp")
    assert exp.max().item() == pytest.approx(2 ** (math.sqrt(32) - 1), rel=1e-5)


def test_connected_components_are_8_connected():
    m = torch.zeros(6, 6, dtype=torch.bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True  # a diagonal: one 8-connected component
    m[5, 0] = m[5, 1] = True
    m[0, 5] = True
    labels = connected_components(m)
    assert labels[0, 0] == labels[1, 1] == labels[2, 2] and labels[5, 0] == labels[5, 1]
    assert len(torch.unique(labels[m])) == 3 and torch.all(labels[~m] == 0)


# --- checkpoint folders ----------------------------------------------------------------------


def test_checkpoint_commit_prune_and_recovery(tmp_path):
    for step in (2, 4, 6):
        tmp = ckpt.begin(tmp_path, step)
        (tmp / "w").write_text(str(step))
        ckpt.write_state(tmp, {"step": step})
        ckpt.commit(tmp)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 6]
    ckpt.prune(tmp_path, 2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    unfinished = ckpt.begin(tmp_path, 8)  # a save killed before its state file
    (unfinished / "w").write_text("half")
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-6"
    with pytest.raises(ckpt.CheckpointNotFound, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(unfinished), tmp_path)
    ckpt.recover(tmp_path)
    assert not unfinished.exists()
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume("latest", tmp_path / "none") is None
    # overwriting a step keeps the old one until the new one is in place
    tmp = ckpt.begin(tmp_path, 6)
    ckpt.write_state(tmp, {"step": 6, "again": True})
    ckpt.commit(tmp)
    assert ckpt.read_state(tmp_path / "checkpoint-6")["again"] is True


def test_defaults_resolve_per_stage():
    s2 = TrainConfig()
    s2.set("train.stage", "2")
    assert (s2.trainable_set, s2.learning_rate, s2.use_gradient_checkpointing) == ("image_attention", 1e-6, True)
    s2.set("optim.optimizer", "prodigy")
    assert s2.learning_rate == 1.0


# --- images as every face reads them; data quirks ---------------------------------------------


def _save_exif_rotated(shown: Image.Image, path: Path) -> None:
    """Save ``shown`` stored sideways with EXIF orientation 6 (as a phone does): viewers show ``shown``."""
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    shown.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    with Image.open(path) as im:
        assert im.size == (shown.height, shown.width)  # stored sideways
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(im)), np.asarray(shown))


def test_training_images_load_as_shown_exif_16bit_and_alpha(tmp_path):
    """EXIF orientation, 16-bit greyscale and transparency: as gie_core.imaging.images.load_image reads them."""
    from gie_core.train.data import load_rgb

    root = tmp_path / "img"
    root.mkdir()
    # a portrait photo stored landscape with an orientation tag
    shown = noise_image(64, 96, 3)
    _save_exif_rotated(shown, root / "s0.png")
    tgt = np.asarray(shown).copy()
    tgt[:10] = 0
    _save_exif_rotated(Image.fromarray(tgt), root / "t0.png")
    # 16-bit greyscale: 0..65535, must not be clipped at 255
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    assert Image.fromarray(ramp).mode == "I;16"
    Image.fromarray(ramp).save(root / "s1.png")
    Image.fromarray(ramp).save(root / "t1.png")
    # transparency hiding red: composited on white
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, fully transparent on the left half
    rgba[:, 32:, 3] = 255
    Image.fromarray(rgba).save(root / "s2.png")
    Image.fromarray(rgba).save(root / "t2.png")
    recs = [{"image": [f"img/s{i}.png", f"img/t{i}.png"], "conversations": [{"from": "human", "value": "x"}]} for i in range(3)]
    (tmp_path / "ann.json").write_text(json.dumps(recs))
    (tmp_path / "data.txt").write_text(f"{tmp_path},{tmp_path}/ann.json,false\n")

    assert np.array_equal(np.asarray(load_rgb(root / "s0.png")), np.asarray(shown))
    grey = np.asarray(load_rgb(root / "s1.png"))
    assert grey.shape == (64, 64, 3) and grey[0, 0, 0] == 0 and grey[-1, -1, 0] == 255
    assert abs(int(grey[32, 0, 0]) - round(ramp[32, 0] / 257)) <= 1  # scaled by the 16-bit range
    alpha = np.asarray(load_rgb(root / "s2.png"))
    assert (alpha[:, :32] == 255).all() and (alpha[:, 32:] == (255, 0, 0)).all()

    problems = ProblemLog()
    records = read_dataset(tmp_path / "data.txt", problems)
    sizes = scan_sizes(records, problems, tmp_path / "index")
    assert sizes[0] == (64, 96) and problems.total == problems.total_warnings == 0  # the size as shown
    assert bucket_for(*sizes[0], "ratio", 64) == (64, 96)  # the portrait (2:3) bucket, not 3:2
    ds = EditDataset(records, [(64, 96), (64, 64), (64, 64)], bucketing="ratio")
    item = ds[0]
    assert item["bad"] == [] and item["source"].shape == (3, 96, 64)
    assert torch.equal(item["source"], torch.from_numpy(np.asarray(shown, np.float32) / 255).permute(2, 0, 1) * 2 - 1)


def test_a_tiny_image_is_reported_as_too_small_not_unreadable(tmp_path):
    write_pairs(tmp_path, [(64, 64), (64, 64)])
    noise_image(8, 8).save(tmp_path / "img/t1.png")
    (tmp_path / "data.txt").write_text(f"{tmp_path},{tmp_path}/ann.json,false\n")
    problems = ProblemLog()
    records = read_dataset(tmp_path / "data.txt", problems)
    assert scan_sizes(records, problems) == [(64, 64), None]
    assert dict(problems.counts) == {"image too small": 1}
    ((kind, where),) = problems.seen
    assert where == str(tmp_path / "img/t1.png")
    ds = EditDataset(records, [(64, 64)] * 2, bucketing="square")
    item = ds[1]  # replaced by the next pair of the bucket, the problem reported with the item
    assert item["index"] == 0
    assert item["bad"] == [("image too small", str(tmp_path / "img/t1.png"), "8x8 is smaller than 16 px a side")]


def test_a_pair_of_different_sizes_trains_with_one_warning_naming_both_sizes(tmp_path, caplog):
    write_pairs(tmp_path, [(64, 64), (64, 64)])
    noise_image(96, 64).save(tmp_path / "img/s1.png")  # source 96x64, target 64x64
    (tmp_path / "data.txt").write_text(f"{tmp_path},{tmp_path}/ann.json,true\n")
    problems = ProblemLog()
    records = read_dataset(tmp_path / "data.txt", problems)
    with caplog.at_level("WARNING", logger="gie_core.train"):
        sizes = scan_sizes(records, problems, tmp_path / "index")
        scan_sizes(records, problems, tmp_path / "index")  # replayed from the index: still once
    assert sizes == [(64, 64), (64, 64)]  # kept: trained at the target's bucket
    assert problems.total == 0 and dict(problems.warnings) == {"size mismatch": 1}
    warned = [r.getMessage() for r in caplog.records if "size mismatch" in r.getMessage()]
    assert len(warned) == 1 and "source is 96x64 but target is 64x64" in warned[0], warned
    assert "trained 1 pairs with warnings: 1 size mismatch" in problems.summary()
    again = ProblemLog()
    scan_sizes(records, again, tmp_path / "index")
    assert dict(again.warnings) == {"size mismatch": 1}
    item = EditDataset(records, sizes, bucketing="ratio")[1]
    assert item["bad"] == [] and item["source"].shape == item["target"].shape == (3, 64, 64)


def test_data_txt_lines_need_all_three_fields(tmp_path):
    write_pairs(tmp_path / "a", [(64, 64)])
    data = tmp_path / "data.txt"
    data.write_text("# two sources\na,a/ann.json,false\na,a/ann.json\n")
    with pytest.raises(DataError) as exc:
        read_data_txt(data)
    msg = str(exc.value)
    assert msg.startswith(f"{data}:3: expected 3 comma-separated fields 'image_root,annotation_json,region_weighting'")
    assert "found 2: 'a,a/ann.json'" in msg
    data.write_text("a,a/ann.json,false,extra\n")
    with pytest.raises(DataError, match=r"data\.txt:1: expected 3 .* found 4"):
        read_data_txt(data)
    data.write_text(",a/ann.json,false\n")
    with pytest.raises(DataError, match=r"data\.txt:1: image_root is empty"):
        read_data_txt(data)


def test_config_and_data_files_that_are_not_utf8_are_named_with_where(tmp_path, capsys):
    from gie_core.cli.train import main

    config = tmp_path / "run.yaml"
    config.write_bytes("output_dir: runs/caf\xe9\n".encode("latin-1"))
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert f"config file {config} is not UTF-8 text: byte 0xe9 at line 1, column 21" in err
    with pytest.raises(SystemExit):
        main(["plan", str(config)])
    assert f"config file {config} is not UTF-8" in capsys.readouterr().err
    write_pairs(tmp_path / "a", [(64, 64)])
    data = tmp_path / "data.txt"
    data.write_bytes("# caf\xe9\na,a/ann.json,false\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"data.txt .*data.txt is not UTF-8 text: byte 0xe9 at line 1, column 6"):
        read_data_txt(data)
    data.write_text("a,a/ann.json,false\n")
    ann = tmp_path / "a" / "ann.json"
    ann.write_bytes(ann.read_bytes().replace(b"invert corner", "caf\xe9".encode("latin-1")))
    with pytest.raises(DataError, match=r"annotation file .*ann.json is not UTF-8 text: byte 0xe9"):
        read_dataset(data, ProblemLog())


def test_trainer_defaults_come_from_the_shared_constants():
    """Patch the constants before the trainer is imported: its defaults must follow (a subprocess,
    so this process's modules are left alone)."""
    import subprocess
    import sys

    code = (
        "import gie_core.constants as c\n"
        "c.DEFAULT_STEPS, c.DEFAULT_GUIDANCE, c.DEFAULT_SEED, c.METAQUERY_TOKENS = 13, 2.25, 7, 5\n"
        "from gie_core.train.config import TrainConfig\n"
        "t = TrainConfig()\n"
        "print(t.validation.steps, t.validation.guidance, t.validation.seed, t.model.num_queries)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["13", "2.25", "7", "5"]
