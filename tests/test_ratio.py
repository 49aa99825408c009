"""Executable specification of pad-to-ratio / crop-padding (gie_core.imaging.ratio)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gie_core.constants import DEFAULT_RATIOS, PREFERRED_KONTEXT_RESOLUTIONS, RESIDUAL_PADDING_THRESHOLD
from gie_core.imaging.ratio import (
    PLACEMENTS,
    RATIO_SETS,
    PadRecord,
    crop_padding,
    has_residual_padding,
    nearest_ratio,
    pad_to_ratio,
    padding_mask,
    parse_ratios,
    residual_padding_fraction,
)

torch.set_num_threads(1)

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RATIO_SPECS = ["default", "kontext", "16:9, 9:16", "4:3,3:4,1:1", [(5, 7)], "1024x768", "21:9"]
COLORS = ["white", "black", "edge", (12, 200, 7), "#a0b1c2", "10, 20, 30"]
KINDS = ["pil", "numpy", "tensor", "batch"]


def make_image(kind: str, w: int, h: int, seed: int = 0, batch: int = 2):
    rng = np.random.default_rng(seed)
    if kind == "batch":
        return torch.from_numpy(rng.random((batch, h, w, 3), dtype=np.float32))
    if kind == "tensor":
        return torch.from_numpy(rng.random((h, w, 3), dtype=np.float32))
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr) if kind == "pil" else arr


def as_uint8(image) -> np.ndarray:
    """[B, H, W, 3] uint8 view of any supported image, for comparisons."""
    if isinstance(image, Image.Image):
        return np.asarray(image)[None]
    if isinstance(image, torch.Tensor):
        t = image if image.ndim == 4 else image[None]
        return (t * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return image[None]


def same(a, b) -> bool:
    """Bit-exact equality with type match."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Image.Image):
        return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def smooth_image(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [
        128 + 100 * np.sin(x / 9.0) * np.cos(y / 13.0),
        128 + 90 * np.cos((x + y) / 17.0),
        60 + 150 * x / w,
    ]
    return np.clip(np.stack(chans, -1), 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Ratios
# ---------------------------------------------------------------------------------------------


def test_parse_named_sets():
    assert parse_ratios("default") == DEFAULT_RATIOS == RATIO_SETS["default"]
    kontext = parse_ratios(" Kontext ")
    assert len(kontext) == len(PREFERRED_KONTEXT_RESOLUTIONS) == 17
    assert (74, 55) in kontext and (1, 1) in kontext and (3, 7) in kontext
    for (rw, rh), (w, h) in zip(kontext, PREFERRED_KONTEXT_RESOLUTIONS):
        assert w * rh == h * rw and math.gcd(rw, rh) == 1


def test_parse_strings_and_pairs():
    assert parse_ratios("1:1, 16:9,9:16") == ((1, 1), (16, 9), (9, 16))
    assert parse_ratios("1024x768") == ((4, 3),)
    assert parse_ratios("2:2, 1:1, 6:4,3:2") == ((1, 1), (3, 2))  # reduced, deduplicated, ordered
    assert parse_ratios([(4, 6), (1, 1), [2, 3]]) == ((2, 3), (1, 1))
    assert parse_ratios(np.array([[3, 2]])) == ((3, 2),)


def test_nearest_ratio_hand_cases():
    assert nearest_ratio(1000, 700, "default") == (3, 2)
    assert nearest_ratio(700, 1000, "default") == (2, 3)
    assert nearest_ratio(1000, 950, "default") == (1, 1)
    assert nearest_ratio(1200, 900, "kontext") == (74, 55)  # 1184x880 reduced
    assert nearest_ratio(1600, 1200, "kontext") == (74, 55)
    assert nearest_ratio(1920, 1080, "1:1, 16:9, 9:16") == (16, 9)


def test_nearest_ratio_ties_go_to_earlier_entry():
    # a square is exactly as far from 3:2 as from 2:3
    assert nearest_ratio(100, 100, [(3, 2), (2, 3)]) == (3, 2)
    assert nearest_ratio(100, 100, [(2, 3), (3, 2)]) == (2, 3)


# ---------------------------------------------------------------------------------------------
# Pad / crop properties
# ---------------------------------------------------------------------------------------------


@FAST
@given(
    w=st.integers(1, 48),
    h=st.integers(1, 48),
    spec=st.sampled_from(RATIO_SPECS),
    color=st.sampled_from(COLORS),
    placement=st.sampled_from(PLACEMENTS),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**16),
)
def test_pad_then_crop_is_bit_exact(w, h, spec, color, placement, kind, seed):
    image = make_image(kind, w, h, seed)
    padded, record = pad_to_ratio(image, spec, color, placement)
    assert type(padded) is type(image)
    back = crop_padding(padded, record)
    assert same(back, image)
    assert PadRecord.from_json(record.to_json()) == record


@FAST
@given(
    w=st.integers(1, 64),
    h=st.integers(1, 64),
    spec=st.sampled_from(RATIO_SPECS),
    placement=st.sampled_from(PLACEMENTS),
)
def test_padded_size_has_exact_ratio_and_is_minimal(w, h, spec, placement):
    image = np.zeros((h, w, 3), dtype=np.uint8)
    padded, r = pad_to_ratio(image, spec, "white", placement)
    rw, rh = r.ratio
    assert r.ratio == nearest_ratio(w, h, spec) and math.gcd(rw, rh) == 1
    assert padded.shape == (r.padded_height, r.padded_width, 3)
    assert r.padded_width * rh == r.padded_height * rw
    k = r.padded_width // rw
    assert r.padded_width == rw * k and r.padded_height == rh * k
    assert r.padded_width >= w and r.padded_height >= h
    assert rw * (k - 1) < w or rh * (k - 1) < h  # no smaller k covers the image
    assert (r.original_width, r.original_height) == (w, h)
    assert r.left + w + r.right == r.padded_width and r.top + h + r.bottom == r.padded_height
    dx, dy = r.padded_width - w, r.padded_height - h
    horizontal = {"center": dx // 2, "top": dx // 2, "bottom": dx // 2, "left": 0, "right": dx}
    vertical = {"center": dy // 2, "left": dy // 2, "right": dy // 2, "top": 0, "bottom": dy}
    assert (r.left, r.top) == (horizontal[placement], vertical[placement])


def test_image_already_at_ratio_gets_no_padding():
    image = make_image("pil", 300, 200)
    padded, r = pad_to_ratio(image, "default")
    assert (r.left, r.top, r.right, r.bottom) == (0, 0, 0, 0)
    assert same(padded, image)


def test_pad_fills_colour_and_keeps_pixels():
    image = make_image("numpy", 10, 7, seed=3)
    padded, r = pad_to_ratio(image, "default", "#102030", "center")
    assert (r.padded_width, r.padded_height, r.left, r.top, r.right, r.bottom) == (12, 8, 1, 0, 1, 1)
    assert np.array_equal(padded[0:7, 1:11], image)
    mask = padding_mask(r).numpy().astype(bool)
    assert np.all(padded[mask] == [16, 32, 48])

    edge, _ = pad_to_ratio(image, "default", "edge", "center")
    assert np.array_equal(edge[7, 1:11], image[6])  # bottom row replicated
    assert np.array_equal(edge[:7, 0], image[:, 0]) and np.array_equal(edge[:7, 11], image[:, 9])

    t = torch.from_numpy(image).float() / 255
    tp, _ = pad_to_ratio(t, "default", "white")
    assert tp.dtype == torch.float32 and torch.all(tp[7] == 1.0)


def test_batch_shares_one_record():
    batch = make_image("batch", 20, 11, batch=3)
    padded, r = pad_to_ratio(batch, "default", "black")
    assert padded.shape == (3, r.padded_height, r.padded_width, 3)
    for i in range(3):
        assert torch.equal(padded[i, r.top : r.top + 11, r.left : r.left + 20], batch[i])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [2.0, 1.5])
def test_crop_of_upscaled_edit_is_close_to_original(kind, scale):
    w, h = 90, 70
    arr = smooth_image(w, h)
    if kind == "pil":
        image = Image.fromarray(arr)
    elif kind == "numpy":
        image = arr
    else:
        image = torch.from_numpy(arr).float() / 255
        if kind == "batch":
            image = torch.stack([image, image.flip(1)])
    padded, r = pad_to_ratio(image, "default", "white")
    W2, H2 = round(r.padded_width * scale), round(r.padded_height * scale)
    # the "edit": the model returned the padded image at a higher resolution
    if isinstance(padded, torch.Tensor):
        p4 = padded if padded.ndim == 4 else padded[None]
        up = torch.nn.functional.interpolate(p4.permute(0, 3, 1, 2), size=(H2, W2), mode="bicubic")
        edited = up.clamp(0, 1).permute(0, 2, 3, 1)
        edited = edited if padded.ndim == 4 else edited[0]
    else:
        pil = padded if isinstance(padded, Image.Image) else Image.fromarray(padded)
        up = pil.resize((W2, H2), Image.Resampling.LANCZOS)
        edited = up if isinstance(padded, Image.Image) else np.asarray(up)
    back = crop_padding(edited, r)
    assert type(back) is type(image)
    got, want = as_uint8(back), as_uint8(image)
    assert got.shape == want.shape
    assert psnr(got, want) > 28


def test_crop_tolerates_one_percent_aspect_drift():
    image = make_image("numpy", 300, 190)
    padded, r = pad_to_ratio(image, "default")  # 300x200
    out = crop_padding(np.zeros((200, 302, 3), np.uint8), r)  # 0.67% wider
    assert out.shape == (190, 300, 3)


# ---------------------------------------------------------------------------------------------
# Record and mask
# ---------------------------------------------------------------------------------------------


def test_pad_record_round_trips():
    _, r = pad_to_ratio(make_image("pil", 123, 77), "kontext", "white", "left")
    assert PadRecord.from_dict(r.to_dict()) == r
    assert PadRecord.from_json(r.to_json()) == r
    d = json.loads(r.to_json())
    assert d["ratio"] == list(r.ratio) and d["original_width"] == 123


@pytest.mark.parametrize("w,h", [(10, 7), (123, 77), (50, 50), (33, 91)])
def test_padding_mask_area(w, h):
    _, r = pad_to_ratio(np.zeros((h, w, 3), np.uint8), "default")
    mask = padding_mask(r)
    assert mask.dtype == torch.float32 and mask.shape == (r.padded_height, r.padded_width)
    assert mask.sum().item() == r.padded_width * r.padded_height - w * h
    big = padding_mask(r, height=r.padded_height * 2, width=r.padded_width * 2)
    assert big.shape == (2 * r.padded_height, 2 * r.padded_width)
    assert big.sum().item() == 4 * (r.padded_width * r.padded_height - w * h)


# ---------------------------------------------------------------------------------------------
# Residual padding
# ---------------------------------------------------------------------------------------------


def test_residual_check_flags_planted_white_border():
    arr = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    clean_flag, clean = has_residual_padding(arr)
    assert (clean_flag, clean) == (False, 0.0)
    arr[:2] = 255  # 2 rows of 200 = 1%
    flag, frac = has_residual_padding(arr)
    assert flag and frac == pytest.approx(0.01)
    assert frac > RESIDUAL_PADDING_THRESHOLD
    arr[:, -3:] = 250  # near-white within tolerance: + 3 columns of the remaining 198 rows
    assert residual_padding_fraction(arr) == pytest.approx((2 * 200 + 3 * 198) / 40000)
    assert residual_padding_fraction(arr, color="black") == 0.0


def test_residual_check_on_padded_image_and_batches():
    image = make_image("numpy", 100, 90, seed=5)
    padded, r = pad_to_ratio(image, "default", "black")
    expect = 1 - 100 * 90 / (r.padded_width * r.padded_height)
    assert residual_padding_fraction(padded, "black") == pytest.approx(expect)
    assert residual_padding_fraction(Image.fromarray(padded), "0,0,0") == pytest.approx(expect)
    batch = torch.from_numpy(np.stack([image, padded[: 90, : 100]])).float() / 255
    batch[1, :, :1] = 1.0  # one white column on the second image only: 1%
    assert residual_padding_fraction(batch) == pytest.approx(0.01)  # batch max


# ---------------------------------------------------------------------------------------------
# Errors name the input, its value and what was expected
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,exc,match",
    [
        ("3:0", ValueError, r"ratio '3:0' must be two positive integers like '3:2'"),
        ("16-9", ValueError, r"ratio '16-9' must be two positive integers"),
        ("1:1, -3:2", ValueError, r"ratio '-3:2' must be two positive integers"),
        ("", ValueError, r"ratios '' is empty"),
        ([(3, 0)], ValueError, r"ratio \(3, 0\) must be a \(width, height\) pair of positive"),
        ([(-3, 2)], ValueError, r"ratio \(-3, 2\) must be"),
        ([(3, 2, 1)], ValueError, r"ratio \(3, 2, 1\) must be"),
        ([3, 2], TypeError, r"ratio 3 must be a \(width, height\) pair"),
        (None, TypeError, r"ratios None \(a NoneType\) must be"),
        (1.5, TypeError, r"ratios 1.5"),
    ],
)
def test_bad_ratios(spec, exc, match):
    with pytest.raises(exc, match=match):
        parse_ratios(spec)


@pytest.mark.parametrize("color", ["purple", "#12345", "#gggggg", "1,2", "300,0,0", (1, 2), (0, 0, 256), (1.0, 2, 3)])
def test_bad_colour(color):
    with pytest.raises(ValueError, match=r"color .* expected 'white', 'black', 'edge'"):
        pad_to_ratio(make_image("numpy", 5, 5), "default", color)


def test_bad_colour_type_and_edge_in_residual():
    with pytest.raises(TypeError, match=r"color 3 \(a int\) must be"):
        pad_to_ratio(make_image("numpy", 5, 5), "default", 3)
    with pytest.raises(ValueError, match=r"color 'edge' is not a fixed colour"):
        residual_padding_fraction(make_image("numpy", 5, 5), "edge")
    with pytest.raises(ValueError, match=r"tolerance -1 must be a number in 0..255"):
        residual_padding_fraction(make_image("numpy", 5, 5), tolerance=-1)


def test_bad_placement():
    with pytest.raises(ValueError, match=r"placement 'middle' is unknown; expected one of \['center'"):
        pad_to_ratio(make_image("numpy", 5, 4), "default", "white", "middle")


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_non_rgb_pil_is_rejected(mode):
    with pytest.raises(ValueError, match=rf"image mode is '{mode}' but must be 'RGB'"):
        pad_to_ratio(Image.new(mode, (8, 8)))


@pytest.mark.parametrize(
    "image,exc,match",
    [
        (torch.zeros(8, 8), ValueError, r"image tensor has shape \[8, 8\] but must be \[H, W, 3\] or \[B, H, W, 3\]"),
        (torch.zeros(1, 8, 8, 4), ValueError, r"shape \[1, 8, 8, 4\]"),
        (torch.zeros(1, 3, 8, 8), ValueError, r"shape \[1, 3, 8, 8\]"),
        (torch.zeros(0, 8, 8, 3), ValueError, r"shape \[0, 8, 8, 3\]"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), TypeError, r"dtype torch.uint8 but must be floating"),
        (np.zeros((8, 8, 3), np.float32), TypeError, r"dtype float32 but must be uint8"),
        (np.zeros((8, 8), np.uint8), ValueError, r"image array has shape \[8, 8\]"),
        ([[1, 2, 3]], TypeError, r"image is a list but must be a PIL.Image"),
    ],
)
def test_bad_image_inputs(image, exc, match):
    with pytest.raises(exc, match=match):
        pad_to_ratio(image)


def test_crop_aspect_mismatch():
    record = PadRecord(1500, 1000, 1536, 1024, 18, 12, 18, 12, (3, 2))
    with pytest.raises(ValueError, match=r"image is 512x512 but the pad record is for a 3:2 padded image \(1536x1024\)"):
        crop_padding(np.zeros((512, 512, 3), np.uint8), record)
    with pytest.raises(ValueError, match=r"resample 'cubic' is unknown"):
        crop_padding(np.zeros((1024, 1536, 3), np.uint8), record, resample="cubic")
    with pytest.raises(TypeError, match=r"record is a dict but must be a PadRecord"):
        crop_padding(np.zeros((1024, 1536, 3), np.uint8), record.to_dict())


GOOD = PadRecord(10, 7, 12, 8, 1, 0, 1, 1, (3, 2)).to_dict()


@pytest.mark.parametrize(
    "d,exc,match",
    [
        ([1, 2], TypeError, r"pad record \[1, 2\] \(a list\) must be a dict"),
        ({k: v for k, v in GOOD.items() if k != "left"}, ValueError, r"missing fields \['left'\]"),
        ({**GOOD, "extra": 1}, ValueError, r"unknown fields \['extra'\]"),
        ({**GOOD, "left": "1"}, TypeError, r"field 'left' is '1' but must be an integer"),
        ({**GOOD, "left": 1.0}, TypeError, r"field 'left' is 1.0 but must be an integer"),
        ({**GOOD, "left": -1, "right": 3}, ValueError, r"field 'left' is -1 but must be non-negative"),
        ({**GOOD, "original_width": 0}, ValueError, r"field 'original_width' is 0 but must be positive"),
        ({**GOOD, "right": 2}, ValueError, r"left 1 \+ original_width 10 \+ right 2 != padded_width 12"),
        ({**GOOD, "bottom": 0}, ValueError, r"top 0 \+ original_height 7 \+ bottom 0 != padded_height 8"),
        ({**GOOD, "ratio": [1, 1]}, ValueError, r"padded size 12x8 does not have its ratio 1:1"),
        ({**GOOD, "ratio": [3, 0]}, ValueError, r"field 'ratio' is \[3, 0\] but must be two positive"),
        ({**GOOD, "ratio": "3:2"}, TypeError, r"field 'ratio' is '3:2' but must be a \(width, height\) pair"),
    ],
)
def test_malformed_record_dict(d, exc, match):
    with pytest.raises(exc, match=match):
        PadRecord.from_dict(d)


def test_malformed_record_json():
    with pytest.raises(ValueError, match=r"pad record JSON '\{nope' is not valid JSON"):
        PadRecord.from_json("{nope")
    with pytest.raises(ValueError, match=r"give both or neither"):
        padding_mask(PadRecord.from_dict(GOOD), height=4)
