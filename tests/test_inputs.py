"""Every input checked once, up front: image files, numbers, sizes, outputs, devices.

The awkward-image set (strips, huge images, every PIL mode, EXIF-rotated, truncated, not an
image) goes through ``gie-edit`` with and without ``--snap``: each gives a correct result or a
clear error naming the input, never a traceback or a silently wrong image. Bad inputs are
refused before any weight is read (the loader is replaced by one that fails the test).
"""

from __future__ import annotations

import errno
import io
import os
import stat

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from gie_core import files
from gie_core.cli import edit as edit_cli
from gie_core.cli.edit import main
from gie_core.imaging.images import load_image, prepare_reference, to_rgb
from gie_core.imaging.ratio import aspect_fits, crop_padding, pad_to_ratio, plan_padding
from gie_core.engine.request import auto_output_size, resolve_device, resolve_edit, resolve_output_size

RUN = ["--steps", "1", "--reference-size", "keep", "--dtype", "fp32", "--device", "cpu", "--quiet"]


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------


def gradient(width: int, height: int) -> np.ndarray:
    """A uint8 RGB image whose every pixel tells where it came from (x in red, y in green)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 80)], -1).round().astype(np.uint8)


def exif_rotated_jpeg(path, stored=(64, 36)) -> None:
    """A JPEG stored landscape with EXIF orientation 6: viewers show it portrait (36x64)."""
    im = Image.fromarray(gradient(*stored))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    im.save(path, exif=exif, quality=95)


def awkward_images(root) -> dict[str, tuple[str, object]]:
    """name -> (path, expected): expected is the (width, height) shown, or an error fragment."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}

    def save(name, im, expected, **kw):
        p = root / name
        im.save(p, **kw)
        out[name] = (str(p), expected)

    base = Image.fromarray(gradient(48, 32))
    save("strip_1px.png", Image.new("RGB", (64, 1)), "at least 16 px")
    save("strip_1px_tall.png", Image.new("RGB", (1, 64)), "at least 16 px")
    save("wide_4000x1000.png", Image.new("RGB", (4000, 1000), (10, 20, 30)), (4000, 1000))
    save("huge_8000x8000.png", Image.new("L", (8000, 8000)), "at most 4096 px")
    save("mode_L.png", base.convert("L"), (48, 32))
    save("mode_LA.png", base.convert("LA"), (48, 32))
    save("mode_P.png", base.convert("P"), (48, 32))
    save("mode_RGBA.png", base.convert("RGBA"), (48, 32))
    save("mode_CMYK.jpg", base.convert("CMYK"), (48, 32))
    i16 = Image.fromarray((np.linspace(0, 65535, 48 * 32).reshape(32, 48)).astype(np.uint16))
    save("mode_I16.png", i16, (48, 32))
    exif_rotated_jpeg(root / "exif_rotated.jpg")
    out["exif_rotated.jpg"] = (str(root / "exif_rotated.jpg"), (36, 64))
    buf = io.BytesIO()
    base.save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated.png"] = (str(root / "truncated.png"), "truncated or damaged")
    (root / "not_an_image.png").write_text("hello")
    out["not_an_image.png"] = (str(root / "not_an_image.png"), "not an image file")
    (root / "a_folder.png").mkdir()
    out["a_folder.png"] = (str(root / "a_folder.png"), "is a directory")
    out["missing.png"] = (str(root / "missing.png"), "does not exist")
    return out


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    return awkward_images(tmp_path_factory.mktemp("awkward"))


def test_exif_orientation_is_applied_on_load(tmp_path):
    exif_rotated_jpeg(tmp_path / "r.jpg")
    im = load_image(tmp_path / "r.jpg")
    assert im.size == (36, 64)
    # orientation 6 = the stored image turned 90 degrees clockwise: the stored top-left corner
    # (red 0, green 0) is now the top-right corner
    arr = np.asarray(im).astype(int)
    assert arr[0, -1, 0] < 40 and arr[0, -1, 1] < 40
    assert arr[-1, -1, 0] > 200  # the stored top-right (red 255) is now bottom-right


def test_16_bit_is_scaled_by_its_range_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 16).reshape(16, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "i16.png")
    with Image.open(tmp_path / "i16.png") as raw:
        assert raw.mode.startswith("I")  # the case this test is about
    arr = np.asarray(load_image(tmp_path / "i16.png")).astype(int)
    expected = np.rint(ramp / 65535 * 255).astype(int)
    assert np.abs(arr[..., 0] - expected).max() <= 1
    assert (arr == 255).mean() < 0.01  # it used to be 99.6% white


def test_transparency_is_composited_on_the_background(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = (200, 0, 0)  # red everywhere, hidden on the left half
    rgba[:, 16:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    white = np.asarray(load_image(tmp_path / "half.png"))
    assert (white[:, :16] == 255).all() and (white[:, 16:] == (200, 0, 0)).all()
    black = np.asarray(load_image(tmp_path / "half.png", background="black"))
    assert (black[:, :16] == 0).all()
    # palette images with a transparent index, in memory too
    p = Image.fromarray(rgba, "RGBA").convert("P")
    assert np.asarray(to_rgb(p.convert("RGBA")))[:, :16].min() == 255


def test_every_mode_becomes_rgb(awkward):
    for name in ("mode_L.png", "mode_LA.png", "mode_P.png", "mode_RGBA.png", "mode_CMYK.jpg", "mode_I16.png"):
        im = load_image(awkward[name][0])
        assert im.mode == "RGB" and im.size == awkward[name][1], name


@pytest.mark.parametrize(
    "name", ["strip_1px.png", "strip_1px_tall.png", "huge_8000x8000.png", "truncated.png", "not_an_image.png",
             "a_folder.png", "missing.png"]
)
def test_bad_image_files_name_the_file_and_the_problem(awkward, name):
    path, fragment = awkward[name]
    with pytest.raises(ValueError, match=fragment) as exc:
        load_image(path, "input image")
    assert "input image" in str(exc.value) and path in str(exc.value)


def test_reference_is_contiguous_and_can_be_resized_like_upstreams_evaluation():
    im = Image.fromarray(gradient(100, 60))
    ours = prepare_reference(im, "preferred")
    assert ours.is_contiguous() and ours.shape == (1, 3, 800, 1328)
    near = prepare_reference(im, "preferred", resample="nearest")
    assert near.is_contiguous() and near.shape == ours.shape
    # nearest only repeats source pixels; lanczos makes new values
    src = set(np.unique(np.asarray(im)[..., 0]).tolist())
    near_vals = set(np.unique(np.rint((near[0, 0].numpy() + 1) / 2 * 255)).astype(int).tolist())
    assert near_vals <= src
    assert not torch.equal(ours, near)
    t = torch.from_numpy(gradient(100, 60).astype(np.float32) / 255)[None]
    assert prepare_reference(t, "keep", resample="nearest").is_contiguous()
    with pytest.raises(ValueError, match="reference resample 'cubic' is unknown"):
        prepare_reference(im, resample="cubic")


# ---------------------------------------------------------------------------------------------
# The request resolver
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"guidance": float("nan")}, "guidance is nan but must be a finite number"),
        ({"guidance": float("inf")}, "guidance is inf but must be a finite number"),
        ({"guidance": -1.0}, "guidance is -1 but must be in 0.0..100.0"),
        ({"true_cfg": float("nan")}, "true CFG scale is nan"),
        ({"true_cfg": 0.5}, "true CFG scale is 0.5 but must be in 1.0..30.0"),
        ({"steps": -3}, "steps is -3 but must be in 1..200"),
        ({"steps": 2.5}, "steps is 2.5 but must be a whole number"),
        ({"seed": 2**70}, "seed is 1180591620717411303424 but must be in 0..18446744073709551615"),
        ({"seed": -1}, "seed is -1"),
        ({"batch_size": 0}, "batch size is 0 but must be in 1..64"),
        ({"width": 100, "height": 64}, "output width is 100 but must be a positive multiple of 16"),
        ({"width": 8192, "height": 64}, "output width is 8192 but must be in 0..4096"),
        ({"image_width": 1}, "input image is 1x64 but must be at least 16 px a side"),
        ({"mode": "fancy"}, "fusion mode 'fancy' is unknown"),
        ({"snap": "1:0"}, "ratio '1:0' must be two positive integers"),
        ({"snap": "default", "width": 64, "height": 64, "image_width": 90, "image_height": 60},
         "does not have the 3:2 aspect"),
        ({"n_images": 2, "batch_size": 3}, "batch of 2 but batch size is 3"),
        ({"reference_resize": "huge"}, "reference resize is 'huge'"),
        ({"true_cfg": 2.0, "has_negative": False}, "no negative conditioning"),
    ],
)
def test_resolver_refuses_bad_values_naming_them(kwargs, fragment):
    base = {"image_width": 64, "image_height": 64}
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        resolve_edit(**{**base, **kwargs})


def test_resolver_sizes_from_the_padded_aspect():
    r = resolve_edit(image_width=320, image_height=240, snap="default", area=256 * 256)
    assert r.pad is not None and r.pad.ratio == (3, 2)
    assert aspect_fits(r.width, r.height, r.pad.padded_width, r.pad.padded_height)
    assert (r.edited_width, r.edited_height) == (360, 240)
    r = resolve_edit(image_width=640, image_height=480, width=512, height=0, snap="default")
    assert (r.width, r.height) == (512, 336)  # 512 / 1.5 = 341.3, rounded to 16: what Crop Padding accepts
    assert resolve_edit(image_width=4000, image_height=1000).width <= 4096


@settings(max_examples=300, deadline=None)
@given(
    w=st.integers(16, 4096), h=st.integers(16, 4096),
    side=st.sampled_from(["auto", "width", "height"]), fixed=st.integers(1, 256).map(lambda k: 16 * k),
    area=st.sampled_from([256 * 256, 512 * 512, 1024 * 1024]),
)
def test_every_size_the_rules_make_is_accepted_by_crop(w, h, side, fixed, area):
    """The one aspect rule: whatever size the resolver makes for a padded image, Crop Padding
    takes back (the defect: width set, height 0 gave a size 'more than 1% off 3:2')."""
    record = plan_padding(w, h, "default")
    pw, ph = record.padded_width, record.padded_height
    width, height = {"auto": (0, 0), "width": (fixed, 0), "height": (0, fixed)}[side]
    try:
        out_w, out_h = resolve_output_size(width, height, pw, ph, area)
    except ValueError:
        return  # the other side would pass 4096: refused clearly, never mis-cropped
    assert out_w % 16 == 0 and out_h % 16 == 0
    assert aspect_fits(out_w, out_h, pw, ph), (w, h, side, fixed, out_w, out_h)
    if side == "auto":
        assert out_w * out_h <= area * 1.1 and max(out_w, out_h) <= 4096


def test_crop_accepts_the_samplers_follow_the_aspect_size():
    img = torch.rand(1, 400, 600, 3)  # 3:2 already
    padded, record = pad_to_ratio(img[:, :, :590], "default")  # 590x400 -> 600x400
    w, h = resolve_output_size(512, 0, record.padded_width, record.padded_height)
    assert (w, h) == (512, 336) and abs(w / h / 1.5 - 1) > 0.01  # more than 1% off 3:2, still accepted
    out = crop_padding(torch.rand(1, h, w, 3), record)
    assert out.shape == (1, 400, 590, 3)
    with pytest.raises(ValueError, match="the pad record is for a 3:2 padded image"):
        crop_padding(torch.rand(1, 64, 64, 3), record)


def test_auto_size_keeps_the_published_one_megapixel_sizes():
    assert auto_output_size(1024, 1024) == (1024, 1024)
    assert auto_output_size(1536, 1024) == (1248, 832)
    assert auto_output_size(1024, 1536) == (832, 1248)
    assert auto_output_size(640, 480) == (1168, 880)


def test_device_that_is_not_there_is_refused():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' was asked for but no CUDA GPU is available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="device 'gpu0' is not a torch device"):
        resolve_device("gpu0")
    assert resolve_device("cpu").type == "cpu"


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def test_outputs_get_the_users_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = files.atomic_write_bytes(tmp_path / "a" / "out.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["out.bin"]  # no temporary left


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "keep.bin"
    path.write_bytes(b"good")

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        files.atomic_write(path, boom)
    assert path.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["keep.bin"]


def test_output_path_checks(tmp_path, monkeypatch):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        files.check_output_path(tmp_path / "dir.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        files.check_output_path(tmp_path / "file" / "out.png")
    real_open = os.open

    def read_only(path, flags, mode=0o777, **kw):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(files.os, "open", read_only)
    with pytest.raises(ValueError, match="cannot be written: Read-only file system"):
        files.check_output_path(tmp_path / "out.png")


# ---------------------------------------------------------------------------------------------
# gie-edit: checks before loading, the awkward-image set, the demo
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Any weight load fails the test: bad input must be refused before it."""
    from gie_core.engine.pipeline import EditPipeline

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr(EditPipeline, "from_paths", classmethod(lambda cls, *a, **k: refuse()))
    monkeypatch.setattr("gie_core.testing.tiny.build_tiny_model_set", refuse)


def _fails(args, fragment, capsys, code=2):
    assert main(args) == code, args
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err
    return err


def test_bad_inputs_are_refused_before_any_weight_is_read(tmp_path, kontext_dir, awkward, no_loading, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(gradient(64, 48)).save(photo)
    out = str(tmp_path / "out.png")
    base = [str(photo), "add a hat", "-o", out, "--kontext", str(kontext_dir), *RUN]
    cases = [
        (["--guidance", "nan"], "guidance is nan"),
        (["--guidance", "inf"], "guidance is inf"),
        (["--true-cfg", "nan"], "true CFG scale is nan"),
        (["--steps", "-2"], "steps is -2"),
        (["--size", "100x64"], "multiple of 16"),
        (["--size=-16x64"], "--size '-16x64'"),
        (["--seed", str(2**70)], "seed is 1180591620717411303424"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "device 'cuda"),
        (["--batch", "0"], "batch size is 0"),
        (["--snap", "1:0"], "ratio '1:0'"),
        (["--lora", "style.safetensors:nan"], "strength is nan but must be a finite number"),
        (["--snap", "--size", "64x64"], "does not have the 3:2 aspect"),
    ]
    for extra, fragment in cases:
        _fails([*base[:-len(RUN)], *RUN, *extra], fragment, capsys)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    _fails([str(tiny), "add a hat", "-o", out, "--kontext", str(kontext_dir), *RUN], "at least 16 px", capsys)
    (tmp_path / "outdir.png").mkdir()
    _fails([str(photo), "add a hat", "-o", str(tmp_path / "outdir.png"), "--kontext", str(kontext_dir), *RUN],
           "is a directory", capsys)
    for name in ("truncated.png", "not_an_image.png", "a_folder.png", "huge_8000x8000.png", "strip_1px.png"):
        path, fragment = awkward[name]
        err = _fails([path, "add a hat", "-o", out, "--kontext", str(kontext_dir), *RUN], fragment, capsys)
        assert path in err
    assert not (tmp_path / "out.png").exists()


def test_read_only_output_folder_is_refused_before_loading(tmp_path, kontext_dir, no_loading, monkeypatch, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(gradient(64, 48)).save(photo)
    real_open = os.open

    def read_only(path, flags, mode=0o777, **kw):
        if flags & os.O_CREAT and str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, mode, **kw)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(files.os, "open", read_only)
    _fails([str(photo), "x", "-o", str(tmp_path / "ro" / "o.png"), "--kontext", str(kontext_dir), *RUN],
           "Read-only file system", capsys)


def test_a_write_that_fails_after_the_edit_is_reported_and_leaves_nothing(tmp_path, kontext_dir, monkeypatch, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(gradient(64, 48)).save(photo)
    out = tmp_path / "o.png"

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(edit_cli, "save_image", lambda im, path: files.atomic_write(path, full))
    _fails([str(photo), "x", "-o", str(out), "--kontext", str(kontext_dir), *RUN, "--size", "64x48"],
           "No space left on device", capsys, code=1)
    assert [p.name for p in tmp_path.iterdir()] == ["photo.png"]


@pytest.mark.parametrize(
    "name", ["wide_4000x1000.png", "mode_L.png", "mode_LA.png", "mode_P.png", "mode_RGBA.png", "mode_CMYK.jpg",
             "mode_I16.png", "exif_rotated.jpg"],
)
def test_awkward_images_edit_and_snap_back_to_their_shown_size(name, awkward, tmp_path, kontext_dir, capsys):
    path, shown = awkward[name]
    plain, snapped = tmp_path / "plain.png", tmp_path / "snapped.png"
    common = ["--kontext", str(kontext_dir), "--steps", "1", "--dtype", "fp32", "--device", "cpu", "--quiet"]
    # small images keep their size as the reference (quick); the 4000 px one goes to a Kontext resolution
    common += ["--reference-size", "preferred" if max(shown) > 1000 else "keep"]
    assert main([path, "add a hat", "-o", str(plain), *common, "--size", "64x0"]) == 0, capsys.readouterr().err
    with Image.open(plain) as im:
        w, h = im.size
        assert im.mode == "RGB" and w == 64
        assert abs(w / h - shown[0] / shown[1]) <= 16 / h  # follows the shown aspect (EXIF applied)
    assert main([path, "add a hat", "-o", str(snapped), *common, "--size", "64x0", "--snap"]) == 0
    with Image.open(snapped) as im:
        assert im.size == shown  # cropped back to the size the user sees


def test_demo_snap_needs_no_size_and_keeps_the_sample_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GIE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "demo.png"
    assert main(["-o", str(out), "--steps", "1", "--quiet", "--snap"]) == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (320, 240)


def test_demo_instruction_is_never_silently_replaced(tmp_path, monkeypatch, capsys, no_loading):
    monkeypatch.setenv("GIE_CACHE_DIR", str(tmp_path / "cache"))
    sample = str(edit_cli.Path(edit_cli.__file__).resolve().parent.parent / "assets" / "sample.png")
    _fails([sample, "", "-o", str(tmp_path / "d.png")], "instruction is empty", capsys)
    with pytest.raises(AssertionError, match="weights were loaded"):  # a valid demo run reaches loading
        main(["-o", str(tmp_path / "d.png")])
    assert "using 'make the sky a warm sunset'" in capsys.readouterr().err


def test_help_says_what_the_demo_size_is(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "~1 MP at the input's aspect" in text and "in the demo" in text
    assert "--reference-resample" in text


def test_outputs_have_normal_permissions(tmp_path, kontext_dir):
    photo = tmp_path / "photo.png"
    Image.fromarray(gradient(64, 48)).save(photo)
    old = os.umask(0o022)
    try:
        assert main([str(photo), "x", "-o", str(tmp_path / "o.png"), "--kontext", str(kontext_dir), *RUN,
                     "--size", "64x48"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o.png").stat().st_mode) == 0o644


def test_rewrite_cli_reports_a_truncated_image(awkward, gie_dir, capsys):
    from gie_core.cli.rewrite import main as rewrite_main

    path, fragment = awkward["truncated.png"]
    assert rewrite_main([path, "add a hat", "--model", str(gie_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert rewrite_main([str(gie_dir), "add a hat", "--model", str(gie_dir), "--device", "cpu"]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_numbered_cpu_is_plain_cpu():
    """`--device cpu:0` (accelerate's name for a process's CPU) is plain `cpu`: on `cpu:0` every
    memory-mapped weight was copied and MKL rounded a pixel differently from a `cpu` run."""
    assert resolve_device("cpu:0") == torch.device("cpu")
    assert resolve_device(torch.device("cpu", 0)).index is None
