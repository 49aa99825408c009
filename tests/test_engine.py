"""The editing engine end to end on tiny random models, checked against diffusers and transformers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from gie_core.engine.conditioning import Conditioning
from gie_core.engine.connector import Connector, QwenFeatures, TextFeatures, fuse
from gie_core.weights.loading import load_gie_checkpoint, load_kontext_dir
from gie_core.engine.pipeline import EditPipeline
from gie_core.engine.request import resolve_edit
from gie_core.engine.sampler import KontextModels, SamplingInterrupted, sample
from gie_core.imaging.images import prepare_reference
from gie_core.weights.reader import CheckpointError

INSTRUCTION = "make the sky a warm sunset"


def noise_image(width, height, seed=0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def t5_pipeline(kontext_dir):
    return EditPipeline.from_paths(kontext_dir=kontext_dir, mode="t5", dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def gie_pipeline(gie_dir, kontext_dir):
    return EditPipeline.from_paths(gie_dir=gie_dir, kontext_dir=kontext_dir, mode="vlm+t5", dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def diffusers_pipe(kontext_dir):
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)


# --- parity with diffusers' FluxKontextPipeline --------------------------------------------


@pytest.mark.parametrize("resize", ["keep", "preferred"])
def test_t5_mode_matches_diffusers_kontext_pipeline(t5_pipeline, diffusers_pipe, resize):
    """Stock Kontext conditioning through our sampler == FluxKontextPipeline, same seed/size/steps."""
    image = noise_image(80, 48)  # non-square reference
    width, height = 96, 64
    ours = t5_pipeline.edit(
        image, INSTRUCTION, mode="t5", steps=3, seed=7, size=(width, height), reference_resize=resize
    ).tensor
    ref = diffusers_pipe(
        image=image, prompt=INSTRUCTION, height=height, width=width, num_inference_steps=3, guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(7), max_sequence_length=256, max_area=width * height,
        _auto_resize=resize == "preferred", output_type="pt",
    ).images.permute(0, 2, 3, 1)
    assert ours.shape == ref.shape == (1, height, width, 3)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_true_cfg_and_batch_match_diffusers(t5_pipeline, diffusers_pipe):
    image = noise_image(64, 64, seed=3)
    ours = t5_pipeline.edit(
        image, INSTRUCTION, mode="t5", steps=2, seed=11, size=(64, 48), batch_size=2, true_cfg=2.5,
        negative_instruction="blurry", reference_resize="keep",
    ).tensor
    ref = diffusers_pipe(
        image=image, prompt=INSTRUCTION, negative_prompt="blurry", true_cfg_scale=2.5, height=48, width=64,
        num_inference_steps=2, num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(11),
        max_sequence_length=256, max_area=64 * 48, _auto_resize=False, output_type="pt",
    ).images.permute(0, 2, 3, 1)
    assert ours.shape == (2, 48, 64, 3)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # a batch holds different images


# --- the released checkpoint layout -------------------------------------------------------


def _written_tensors(gie_dir):
    index = json.loads((gie_dir / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(gie_dir / shard, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def test_released_layout_splits_into_three_parts_with_every_tensor_equal(gie_dir):
    written = _written_tensors(gie_dir)
    ck = load_gie_checkpoint(gie_dir, dtype="fp32", lm_head=True)  # lm_head now, not on demand
    qwen = ck.encoder.model.state_dict()
    conn = ck.connector.state_dict()
    flux = ck.transformer.state_dict()
    assert len(qwen) + len(conn) + len(flux) == len(written)
    for key, tensor in written.items():
        if key.startswith("denoise_tower.denoise_projector."):
            got = conn["denoise_projector." + key.split("denoise_projector.", 1)[1]]
        elif key.startswith("denoise_tower.denoiser."):
            got = flux[key[len("denoise_tower.denoiser."):]]
        elif key.startswith("visual."):
            got = qwen["model." + key]
        elif key.startswith("model."):
            got = qwen["model.language_model." + key[len("model."):]]
        else:
            got = qwen[key]
        assert torch.equal(got, tensor), key
    # the fine-tuned denoiser is its own weights, not the stock Kontext transformer's
    assert ck.config["denoise_tower"]["denoiser_config"]["num_layers"] == ck.transformer.config.num_layers


def test_connector_is_linear_silu_linear(gie_dir):
    written = _written_tensors(gie_dir)
    ck = load_gie_checkpoint(gie_dir, dtype="fp32", parts=("connector",))
    w0, b0 = written["denoise_tower.denoise_projector.0.weight"], written["denoise_tower.denoise_projector.0.bias"]
    w2, b2 = written["denoise_tower.denoise_projector.2.weight"], written["denoise_tower.denoise_projector.2.bias"]
    assert w0.shape[0] == 3 * w2.shape[0]  # hidden = 3 x output
    x = torch.randn(2, 5, w0.shape[1])
    h = x @ w0.T + b0
    expected = (h * torch.sigmoid(h)) @ w2.T + b2
    assert torch.allclose(ck.connector(x), expected, atol=1e-6)


def _reference_rope_positions(input_ids, image_token_id, grid_hw, merge):
    """mRoPE positions computed the reference way: text 1-D, image tokens (t, row, col) from the
    position after the preceding text, text after the image continues from max + 1."""
    ids = input_ids[0].tolist()
    pos = torch.zeros(3, 1, len(ids), dtype=torch.long)
    first = ids.index(image_token_id)
    n = ids.count(image_token_id)
    rows, cols = grid_hw[0] // merge, grid_hw[1] // merge
    assert rows * cols == n
    for i in range(first):
        pos[:, 0, i] = i
    for j in range(n):
        pos[0, 0, first + j] = first
        pos[1, 0, first + j] = first + j // cols
        pos[2, 0, first + j] = first + j % cols
    nxt = first + max(rows, cols)
    for k, i in enumerate(range(first + n, len(ids))):
        pos[:, 0, i] = nxt + k
    return pos


def test_qwen_encode_matches_transformers_forward(gie_dir):
    """Our encode == a stock transformers model (loaded by transformers itself from the same
    directory) run on the same token ids with mRoPE positions computed the reference way."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from gie_core.weights.loading import gie_config, qwen_config_from_gie

    ck = load_gie_checkpoint(gie_dir, dtype="fp32", parts=("encoder",))
    enc = ck.encoder
    image = noise_image(300, 200)
    text = enc.prompt(INSTRUCTION)
    assert not text.startswith("<|im_start|>system")
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + INSTRUCTION)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")

    inputs = enc.inputs(image, INSTRUCTION)
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]  # 448x448
    assert int((inputs["input_ids"] == enc.image_token_id).sum()) == 256
    ours = enc.encode(image, INSTRUCTION).hidden

    ref_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        gie_dir, config=qwen_config_from_gie(gie_config(gie_dir)), local_files_only=True, dtype=torch.float32
    ).eval()
    positions = _reference_rope_positions(inputs["input_ids"], enc.image_token_id, (32, 32), 2)
    with torch.no_grad():
        ref = ref_model.model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=positions,
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], use_cache=False,
        ).last_hidden_state
    assert ours.shape == ref.shape == (1, inputs["input_ids"].shape[1], enc.hidden_size)
    assert (ours - ref).abs().max().item() <= 1e-5


# --- fusion ---------------------------------------------------------------------------------


def test_vlm_t5_fusion_order_and_pooled(gie_pipeline):
    text = gie_pipeline.text.encode(INSTRUCTION)
    vlm = gie_pipeline.qwen.encode(noise_image(64, 64), INSTRUCTION)
    projected = gie_pipeline.connector(vlm.hidden)
    cond = fuse("vlm+t5", gie_pipeline.connector, vlm, text)
    n_vlm = vlm.hidden.shape[1]
    assert cond.context.shape[1] == n_vlm + 256
    assert torch.equal(cond.context[:, :n_vlm], projected)  # VLM tokens first
    assert torch.equal(cond.context[:, n_vlm:], text.t5)  # T5 tokens after
    clip_instr = gie_pipeline.text.clip_pooled([INSTRUCTION])
    clip_empty = gie_pipeline.text.clip_pooled([""])
    assert torch.allclose(cond.pooled, clip_instr, atol=1e-6)
    vlm_only = fuse("vlm", gie_pipeline.connector, vlm, text)
    assert torch.equal(vlm_only.context, projected)
    assert torch.allclose(vlm_only.pooled, clip_empty, atol=1e-6)
    assert not torch.allclose(clip_instr, clip_empty)


def test_training_modes_need_their_parameters():
    conn = Connector(8, 4)
    vlm = QwenFeatures(torch.randn(1, 6, 8))
    text = TextFeatures(torch.randn(1, 3, 4), torch.randn(1, 5), torch.randn(1, 5))
    with pytest.raises(ValueError, match="vlm\\+t5\\+type.*supports vlm, t5, vlm\\+t5"):
        fuse("vlm+t5+type", conn, vlm, text)
    typed = Connector.for_mode("vlm+t5+type", 8, 4)
    with torch.no_grad():
        typed.type_embedding.copy_(torch.tensor([[1.0] * 4, [-2.0] * 4]))
    cond = fuse("vlm+t5+type", typed, vlm, text)
    assert torch.allclose(cond.context[:, 6:], text.t5 - 2.0)
    assert torch.allclose(cond.context[:, :6], typed(vlm.hidden) + 1.0)
    mq = Connector.for_mode("metaquery", 8, 4, num_queries=3)
    cond = fuse("metaquery", mq, QwenFeatures(torch.randn(1, 9, 8), num_queries=3), text)
    assert cond.context.shape == (1, 3, 4)
    with pytest.raises(ValueError, match="unknown"):
        fuse("clip", conn, vlm, text)


def test_metaquery_queries_reach_qwen(gie_pipeline):
    conn = Connector.for_mode("metaquery", gie_pipeline.qwen.hidden_size, 32, num_queries=4)
    image = noise_image(64, 64)
    feats = gie_pipeline.qwen.encode(image, INSTRUCTION, queries=conn.queries.detach())
    plain = gie_pipeline.qwen.encode(image, INSTRUCTION)
    assert feats.hidden.shape[1] == plain.hidden.shape[1] + 4 and feats.num_queries == 4
    # causal attention: the tokens before the queries are unchanged
    assert torch.allclose(feats.hidden[:, :-4], plain.hidden, atol=1e-5)


def test_comfy_conditioning_round_trip():
    cond = Conditioning(torch.randn(2, 7, 32), torch.randn(2, 64), {"guidance": 2.0})
    native = cond.to_comfy()
    assert torch.equal(native[0][0], cond.context) and torch.equal(native[0][1]["pooled_output"], cond.pooled)
    back = Conditioning.from_comfy(native)
    assert torch.equal(back.context, cond.context) and back.extra["guidance"] == 2.0


# --- sampling controls ------------------------------------------------------------------------


def test_progress_seed_and_interrupt(t5_pipeline):
    models = KontextModels(t5_pipeline.transformer, t5_pipeline.vae, t5_pipeline.scheduler)
    cond = t5_pipeline.conditioning(noise_image(64, 64), INSTRUCTION, "t5")
    ref = prepare_reference(noise_image(64, 64), "keep")
    seen = []
    request = resolve_edit(image_width=64, image_height=64, width=64, height=64, steps=4, seed=5)
    a = sample(models, cond, ref, request, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    b = sample(models, cond, ref, request)
    c = sample(models, cond, ref, dataclasses.replace(request, seed=6))
    assert torch.equal(a, b) and not torch.equal(a, c)

    calls = []

    def stop_during_step_two():
        calls.append(1)
        return len(calls) > 4  # a few block checks into the second step

    with pytest.raises(SamplingInterrupted):
        sample(models, cond, ref, request, interrupt=stop_during_step_two)
    # hooks are removed: the next run is unaffected
    again = sample(models, cond, ref, request)
    assert torch.equal(a, again)


def test_snap_pads_and_crops_back_to_input_size(gie_pipeline):
    image = noise_image(90, 50)
    result = gie_pipeline.edit(image, INSTRUCTION, steps=1, size=(96, 64), snap="default", reference_resize="keep")
    assert result.pad_record is not None and result.pad_record.ratio == (3, 2)
    assert result.images[0].size == (90, 50)


# --- bad input ----------------------------------------------------------------------------------


def test_bad_inputs_fail_clearly(gie_pipeline, tmp_path, gie_dir, kontext_dir):
    with pytest.raises(ValueError, match="instruction is empty"):
        gie_pipeline.edit(noise_image(64, 64), "   ", steps=1)
    with pytest.raises(ValueError, match="guidance is nan but must be a finite number"):
        gie_pipeline.edit(noise_image(64, 64), INSTRUCTION, steps=1, guidance=float("nan"))
    with pytest.raises(ValueError, match="holds NaN"):
        gie_pipeline.edit(torch.full((1, 32, 32, 3), float("nan")), INSTRUCTION, steps=1)
    with pytest.raises(ValueError, match="at least 16 px"):
        gie_pipeline.edit(noise_image(8, 64), INSTRUCTION, steps=1)
    with pytest.raises(ValueError, match="at most 4096 px"):
        gie_pipeline.edit(torch.zeros(1, 16, 5000, 3), INSTRUCTION, steps=1)
    with pytest.raises(ValueError, match="width is 100 but must be a positive multiple of 16"):
        gie_pipeline.edit(noise_image(64, 64), INSTRUCTION, steps=1, size=(100, 64))
    with pytest.raises(ValueError, match="fusion mode 'fancy' is unknown"):
        gie_pipeline.edit(noise_image(64, 64), INSTRUCTION, steps=1, mode="fancy")
    with pytest.raises(CheckpointError, match="not a GPT-Image-Edit checkpoint"):
        load_gie_checkpoint(kontext_dir)
    with pytest.raises(CheckpointError, match="is a GPT-Image-Edit checkpoint, not a FLUX.1-Kontext"):
        load_kontext_dir(gie_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gie_checkpoint(tmp_path / "nope")


def test_corrupt_and_missing_shards_fail_clearly(gie_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(gie_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gie_checkpoint(broken, dtype="fp32")
    shard.unlink()
    with pytest.raises(CheckpointError, match="lists shards that are missing"):
        load_gie_checkpoint(broken, dtype="fp32")


def test_several_references_get_distinct_positions():
    from gie_core.engine.sampler import pack_latents, reference_tokens, unpack_latents

    a, b = torch.randn(1, 16, 8, 12), torch.randn(1, 16, 8, 8)
    assert torch.equal(unpack_latents(pack_latents(a), 8, 12), a)
    tokens, ids = reference_tokens([a, b], "index")
    assert tokens.shape == (1, 4 * 6 + 4 * 4, 64)
    assert ids[:24, 0].eq(1).all() and ids[24:, 0].eq(2).all()  # Kontext's first coordinate: 1, then 2
    tokens, ids = reference_tokens([a, b], "offset")
    assert ids[:, 0].eq(1).all()
    # the second reference sits beside or below the first, never on top of it
    first = {tuple(r) for r in ids[:24, 1:].tolist()}
    second = {tuple(r) for r in ids[24:, 1:].tolist()}
    assert not first & second
    with pytest.raises(ValueError, match="reference method 'stack' is unknown"):
        reference_tokens([a], "stack")


def test_two_references_change_the_edit(t5_pipeline):
    models = KontextModels(t5_pipeline.transformer, t5_pipeline.vae, t5_pipeline.scheduler)
    cond = t5_pipeline.conditioning(noise_image(64, 64), INSTRUCTION, "t5")
    one = prepare_reference(noise_image(64, 64, seed=1), "keep")
    two = prepare_reference(noise_image(48, 64, seed=2), "keep")
    request = resolve_edit(image_width=64, image_height=64, width=64, height=64, steps=2, seed=3)
    single = sample(models, cond, one, request)
    double = sample(models, cond, [one, two], request)
    assert single.shape == double.shape and not torch.allclose(single, double)
