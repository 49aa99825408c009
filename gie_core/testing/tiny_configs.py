"""Architecture configs of the *tiny random* model set used by tests and the demo run.

Same classes and on-disk layouts as the real models, only small. Real sizes are noted beside
each value. Tokenizer-dependent ids (CLIP eos, Qwen special tokens) are filled in by
``gie_core.testing.tiny`` from the tokenizers it builds.
"""

from __future__ import annotations

TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x 2x2 pack (real: same)
    out_channels=None,
    num_layers=1,  # real 19
    num_single_layers=1,  # real 38
    attention_head_dim=32,  # real 128
    num_attention_heads=2,  # real 24
    joint_attention_dim=32,  # real 4096
    pooled_projection_dim=64,  # = CLIP hidden (real 768)
    guidance_embeds=True,
    # real (16, 56, 56): the same 1/8, 7/16, 7/16 split of the head, so single-file loading can
    # infer it from the head width alone
    axes_dims_rope=(4, 14, 14),
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32),  # real (128, 256, 512, 512)
    layers_per_block=1,  # real 2
    norm_num_groups=32,  # real 32: not visible in weights, so kept real
    latent_channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    sample_size=64,
)

TINY_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

TINY_CLIP_TEXT = dict(
    hidden_size=64,  # real 768
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=1,  # real 12: head width 64 as in the real model (not visible in weights)
    max_position_embeddings=77,
    projection_dim=64,
    # vocab_size, bos/eos/pad ids come from the tokenizer
)

TINY_T5 = dict(
    d_model=32,  # real 4096
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8,
    is_encoder_decoder=False,
    use_cache=False,
    # vocab_size from the tokenizer
)

TINY_QWEN_TEXT = dict(
    hidden_size=32,  # real 3584
    intermediate_size=37,
    num_hidden_layers=2,  # real 28
    num_attention_heads=2,
    num_key_value_heads=1,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)

TINY_QWEN_VISION = dict(
    depth=2,  # real 32
    hidden_size=32,  # real 1280
    intermediate_size=37,
    num_heads=2,
    out_hidden_size=32,  # = text hidden size (real 3584)
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
    in_chans=3,
)

# The connector maps Qwen hidden (input) to the transformer's joint_attention_dim (output),
# with a hidden width of 3 x output (real 3584 -> 12288 -> 4096).
TINY_CONNECTOR = dict(input_hidden_size=32, output_hidden_size=32)
