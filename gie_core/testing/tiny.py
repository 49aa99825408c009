"""Builders of the *tiny random* GPT-Image-Edit model set, in the real on-disk layouts.

Tests and the ``gie-edit`` demo mode need every model this project loads (the FLUX.1 Kontext
[dev] diffusers directory and the released GPT-Image-Edit checkpoint) without downloading
anything. This module trains tiny tokenizers offline, builds the architectures of
``gie_core.testing.tiny_configs`` with random weights and saves them exactly as the real files are laid
out, so the real loading code runs against them.

Nothing here downloads: only ``tokenizers``, ``sentencepiece``, ``transformers``, ``diffusers``
and ``safetensors`` APIs are used, with every file built locally.

The checkpoint renaming below (new transformers names -> the pre-4.52 names of the released
checkpoint) is written independently of the project's loader on purpose: tests compare the two.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2TokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from gie_core.files import atomic_folder
from gie_core.testing.tiny_configs import (
    TINY_CLIP_TEXT,
    TINY_CONNECTOR,
    TINY_QWEN_TEXT,
    TINY_QWEN_VISION,
    TINY_SCHEDULER,
    TINY_T5,
    TINY_TRANSFORMER,
    TINY_VAE,
)
from gie_core.weights.loading import quiet_transformers

with quiet_transformers():  # diffusers' pipelines import image processors that ask for torchvision
    from diffusers import FluxKontextPipeline

# Bump when the files this module writes change, so stale caches are rebuilt.
TINY_LAYOUT_VERSION = "tiny-v1.0"

MARKER_NAME = ".complete"

# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------

# A small English corpus: edit instructions in the style of GPT-Image-Edit-1.5M plus the words of
# the Qwen chat template, so common words become single tokens in every tokenizer.
_EDIT_CORPUS: tuple[str, ...] = (
    "Make the background a city street.",
    "Change the background to a city street at night.",
    "Add a red hat to the man.",
    "Add a red hat to the woman on the left.",
    "Remove the person from the image.",
    "Remove the person standing on the right.",
    "Change the sky to a sunset.",
    "Change the color of the sky to deep blue.",
    "Make the sky cloudy and dark.",
    "Replace the dog with a cat.",
    "Replace the car with a bicycle.",
    "Turn the photo into a watercolor painting.",
    "Turn the image into a pencil sketch.",
    "Make it look like a photo taken in winter with snow.",
    "Add snow to the ground and the trees.",
    "Make the grass green and the flowers yellow.",
    "Change the shirt color to white.",
    "Change the color of the car to red.",
    "Put sunglasses on the girl.",
    "Give the boy a blue jacket.",
    "Add a small bird on the branch.",
    "Add a cup of coffee on the table.",
    "Remove the text from the sign.",
    "Remove the watermark in the corner.",
    "Erase the power lines from the sky.",
    "Make the man smile.",
    "Make the woman look older.",
    "Make the room brighter.",
    "Make the lighting warm and soft.",
    "Change the season to autumn with orange leaves.",
    "Replace the background with a beach and the ocean.",
    "Replace the background with a forest of tall trees.",
    "Put the cat on a wooden chair.",
    "Add a rainbow over the mountains.",
    "Change the day into night with a full moon.",
    "Make the water in the lake clear and blue.",
    "Add a fire hydrant next to the street.",
    "Keep the hydrant and change the background to an urban city street.",
    "Maintain the soft overcast lighting and the shallow depth of field.",
    "Replace the entire background beyond the subject with a busy city street.",
    "Change the style to a cartoon.",
    "Make the photo black and white.",
    "Add a hat, a scarf and gloves to the snowman.",
    "Remove the people in the background.",
    "Remove the old car parked on the street.",
    "Change the text on the sign to OPEN.",
    "Add 3 red balloons to the picture.",
    "Add two dogs playing in the park.",
    "Make the house look new and clean.",
    "Paint the wall in light green.",
    "Extract the person and put them on a white background.",
    "The input image shows a man in a park; edit: add a red hat; output: the same man wearing a red hat.",
    "You are a helpful assistant.",
    "system user assistant",
    "Describe this image.",
    "What is in the picture?",
    "A photo of a cat sitting on a sofa in a living room.",
    "A city street with cars, buildings and people walking.",
    "A portrait of a young woman with long hair.",
    "A red apple on a white plate, 1024 x 1024, high quality.",
)

# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

# CLIP's pre-tokenizer split (lower-cased words, single digits, runs of punctuation).
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# Qwen2's pre-tokenizer split (spaces stay attached to the following word).
_QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# The Qwen2 / Qwen2.5-VL special tokens, in the order of their ids in the real vocabulary
# (151643 ... 151656).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The official Qwen2.5-VL-Instruct chat template (chat_template.json of the released model).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# preprocessor_config.json of Qwen2.5-VL (the Qwen2-VL image processor, OpenAI CLIP statistics).
QWEN_PREPROCESSOR_CONFIG: dict = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": 12845056,
    "merge_size": 2,
    "min_pixels": 3136,
    "patch_size": 14,
    "processor_class": "Qwen2_5_VLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "temporal_patch_size": 2,
}

_CLIP_MERGES = 400
_QWEN_MERGES = 400
_T5_PIECES = 200
_T5_EXTRA_IDS = 100


@dataclass(frozen=True)
class TinyTokenizerPaths:
    """Directories of the three tiny tokenizers built by :func:`build_tokenizers`."""

    clip: Path  # CLIPTokenizer(Fast) directory (FLUX ``tokenizer/``)
    t5: Path  # T5TokenizerFast directory (FLUX ``tokenizer_2/``)
    qwen: Path  # Qwen2TokenizerFast directory + chat template + preprocessor_config.json


def _bytes_to_unicode() -> list[str]:
    """The 256 byte-level BPE characters, in GPT-2 / CLIP / Qwen vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


def _train_byte_level_merges(split_regex: str, *, lowercase: bool, end_of_word_suffix: str,
                             num_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Train byte-level BPE merges on the built-in corpus.

    Words come from the real normaliser and pre-tokenizer (``tokenizers`` components); the merge
    loop is done here because ``tokenizers.trainers.BpeTrainer`` breaks ties between equally
    frequent pairs in hash order, which changes the files from one process to the next. Ties are
    broken by the pair itself, so every run writes the same vocabulary.
    """
    norm = [normalizers.NFC()]
    if lowercase:
        norm += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    normalizer = normalizers.Sequence(norm)
    # CLIP drops whitespace between pieces ("removed", invert); Qwen keeps it attached ("isolated").
    split = (
        pre_tokenizers.Split(Regex(split_regex), behavior="removed", invert=True)
        if lowercase
        else pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False)
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    word_counts: Counter[str] = Counter()
    for line in _EDIT_CORPUS:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            word_counts[word] += 1
    words = [
        (list(w[:-1]) + [w[-1] + end_of_word_suffix], c) for w, c in sorted(word_counts.items()) if w
    ]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, c in words:
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += c
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        if pair_counts[best] < min_frequency:
            break
        merges.append(best)
        joined = best[0] + best[1]
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    symbols[i:i + 2] = [joined]
                i += 1
    return merges


def _bpe_vocab(base: list[str], merges: list[tuple[str, str]], specials: tuple[str, ...]) -> dict[str, int]:
    """Vocabulary in the real order: base symbols, one token per merge, then the special tokens."""
    vocab: dict[str, int] = {}
    for piece in base:
        vocab.setdefault(piece, len(vocab))
    for a, b in merges:
        if a not in vocab or b not in vocab:  # the trainer guarantees this; keep the file loadable
            raise ValueError(f"BPE merge ({a!r}, {b!r}) uses a symbol missing from the vocabulary")
        vocab.setdefault(a + b, len(vocab))
    for piece in specials:
        vocab.setdefault(piece, len(vocab))
    return vocab


def _takes_vocab_objects(cls) -> bool:
    """transformers 5 tokenizers take ``vocab``/``merges`` objects; 4.x take file paths."""
    return "vocab" in inspect.signature(cls.__init__).parameters


def _write_bpe_files(d: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> tuple[str, str]:
    vocab_file, merges_file = d / "vocab.json", d / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return str(vocab_file), str(merges_file)


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    """The tiny CLIP tokenizer; its eos ``<|endoftext|>`` is the highest id, as in real CLIP."""

    merges = _train_byte_level_merges(_CLIP_SPLIT, lowercase=True, end_of_word_suffix="</w>",
                                      num_merges=_CLIP_MERGES)
    base = _bytes_to_unicode()
    vocab = _bpe_vocab(base + [c + "</w>" for c in base], merges, (CLIP_BOS, CLIP_EOS))
    kwargs = dict(unk_token=CLIP_EOS, bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS,
                  model_max_length=77)
    if _takes_vocab_objects(CLIPTokenizerFast):
        tok = CLIPTokenizerFast(vocab=vocab, merges=list(merges), **kwargs)
    else:
        with tempfile.TemporaryDirectory() as d:
            vocab_file, merges_file = _write_bpe_files(Path(d), vocab, merges)
            tok = CLIPTokenizerFast(vocab_file=vocab_file, merges_file=merges_file, **kwargs)
    if tok.eos_token_id != len(tok) - 1:
        raise RuntimeError(f"tiny CLIP eos id is {tok.eos_token_id}, expected the highest id {len(tok) - 1}")
    return tok


@functools.lru_cache(maxsize=1)
def _t5_spm_model() -> bytes:
    """A SentencePiece unigram model trained in memory (pad 0, eos 1, unk 2, no bos)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_EDIT_CORPUS),
        model_writer=buf,
        vocab_size=_T5_PIECES,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _t5_tokenizer():
    """The tiny T5 tokenizer: the unigram pieces, then 100 sentinels in reverse, as in real T5."""
    model = _t5_spm_model()
    kwargs = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=_T5_EXTRA_IDS,
                  model_max_length=512)
    if _takes_vocab_objects(T5TokenizerFast):
        sp = spm.SentencePieceProcessor(model_proto=model)
        pieces = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
        pieces += [(f"<extra_id_{i}>", 0.0) for i in range(_T5_EXTRA_IDS - 1, -1, -1)]
        try:  # the real T5 tokenizer.json carries SentencePiece's NFKC normaliser
            from sentencepiece import sentencepiece_model_pb2  # probe: needs protobuf; without it the charsmap is left out

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(model)
            kwargs["_spm_precompiled_charsmap"] = proto.normalizer_spec.precompiled_charsmap
        except ImportError:
            pass
        tok = T5TokenizerFast(vocab=pieces, **kwargs)
    else:
        with tempfile.TemporaryDirectory() as d:
            spiece = Path(d) / "spiece.model"
            spiece.write_bytes(model)
            tok = T5TokenizerFast(vocab_file=str(spiece), **kwargs)
    ids = (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)
    if ids != (0, 1, 2):
        raise RuntimeError(f"tiny T5 pad/eos/unk ids are {ids}, expected (0, 1, 2)")
    return tok


@functools.lru_cache(maxsize=1)
def _qwen_tokenizer():
    """The tiny Qwen2 tokenizer: byte-level BPE, then the Qwen special tokens in their real order."""
    merges = _train_byte_level_merges(_QWEN_SPLIT, lowercase=False, end_of_word_suffix="",
                                      num_merges=_QWEN_MERGES)
    vocab = _bpe_vocab(_bytes_to_unicode(), merges, QWEN_SPECIAL_TOKENS)
    kwargs = dict(
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        padding_side="left",
        model_max_length=32768,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    if _takes_vocab_objects(Qwen2TokenizerFast):
        tok = Qwen2TokenizerFast(vocab=vocab, merges=list(merges), **kwargs)
    else:
        with tempfile.TemporaryDirectory() as d:
            vocab_file, merges_file = _write_bpe_files(Path(d), vocab, merges)
            tok = Qwen2TokenizerFast(vocab_file=vocab_file, merges_file=merges_file, **kwargs)
    tok.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    got = tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    want = [vocab[t] for t in QWEN_SPECIAL_TOKENS]
    if got != want:
        raise RuntimeError(f"tiny Qwen special token ids are {got}, expected {want}")
    return tok


def _qwen_special_ids() -> dict[str, int]:
    """Special-token ids of the tiny Qwen tokenizer, keyed like the Qwen2.5-VL config fields."""
    tok = _qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_qwen_processor_files(d: Path) -> None:
    """Tokenizer, chat template and image-processor config, as the released directories carry."""
    d.mkdir(parents=True, exist_ok=True)
    _qwen_tokenizer().save_pretrained(d)
    _write_json(d / "chat_template.json", {"chat_template": QWEN2_5_VL_CHAT_TEMPLATE})
    _write_json(d / "preprocessor_config.json", QWEN_PREPROCESSOR_CONFIG)


def build_tokenizers(root: Path) -> TinyTokenizerPaths:
    """Train and save the three tiny tokenizers under ``root`` (``clip/``, ``t5/``, ``qwen/``).

    CLIP: byte-level BPE with ``</w>`` word ends, ``model_max_length`` 77, eos/pad
    ``<|endoftext|>`` as the highest id (so legacy argmax pooling agrees with eos pooling).
    T5: SentencePiece unigram trained in memory, pad 0 / eos 1 / unk 2, 100 sentinels.
    Qwen: byte-level BPE with the Qwen special tokens appended in their real order, eos
    ``<|im_end|>``, pad ``<|endoftext|>``, left padding, the official Qwen2.5-VL chat template,
    plus ``chat_template.json`` and a Qwen2-VL ``preprocessor_config.json``.
    The files are the same on every run.
    """
    root = Path(root)
    paths = TinyTokenizerPaths(clip=root / "clip", t5=root / "t5", qwen=root / "qwen")
    paths.clip.mkdir(parents=True, exist_ok=True)
    paths.t5.mkdir(parents=True, exist_ok=True)
    _clip_tokenizer().save_pretrained(paths.clip)
    _t5_tokenizer().save_pretrained(paths.t5)
    _save_qwen_processor_files(paths.qwen)
    return paths


# --------------------------------------------------------------------------------------------
# FLUX.1 Kontext [dev] diffusers directory
# --------------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_kontext_dir(path: Path, seed: int = 0) -> Path:
    """Save a tiny random FLUX.1-Kontext-dev diffusers directory at ``path`` and return it.

    Same layout as the real repository: ``model_index.json`` (FluxKontextPipeline),
    ``transformer/``, ``vae/``, ``text_encoder/`` (CLIP-L), ``text_encoder_2/`` (T5),
    ``tokenizer/``, ``tokenizer_2/`` and ``scheduler/``, weights in safetensors. Loads with
    ``FluxKontextPipeline.from_pretrained(path, local_files_only=True)``.
    """
    path = Path(path)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **TINY_CLIP_TEXT,
            vocab_size=len(clip_tok),
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            **TINY_T5,
            vocab_size=_round_up(len(t5_tok), 64),  # padded like the real 32100 -> 32128
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# --------------------------------------------------------------------------------------------
# Released GPT-Image-Edit checkpoint
# --------------------------------------------------------------------------------------------


def _to_released_name(key: str) -> str:
    """Map a current transformers Qwen2.5-VL key to the pre-4.52 name the release uses."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    if key == "lm_head.weight":
        return key
    if key.startswith(("model.", "visual.")):  # transformers < 4.52 already uses these names
        return key
    raise ValueError(f"unexpected Qwen2.5-VL state-dict key {key!r}")


def _parse_size(size: str | int) -> int:
    """``"200KB"`` -> 200_000 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, as huggingface_hub)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size is {size!r} but expected digits and a unit such as '200KB'")
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(m.group(1)) * units.get((m.group(2) or "b").lower(), 1)


def _qwen_flat_config(vocab_size: int, special_ids: dict[str, int]) -> dict:
    """Qwen2.5-VL config fields in the flat (pre-4.52) style of the released config.json."""
    text = dict(TINY_QWEN_TEXT)
    vision = dict(TINY_QWEN_VISION)
    return {
        "attention_dropout": 0.0,
        "bos_token_id": special_ids["bos_token_id"],
        "eos_token_id": special_ids["eos_token_id"],
        "hidden_act": "silu",
        "hidden_size": text["hidden_size"],
        "image_token_id": special_ids["image_token_id"],
        "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"],
        "max_position_embeddings": text["max_position_embeddings"],
        "max_window_layers": text["num_hidden_layers"],
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"type": "mrope", "mrope_section": list(text["rope_scaling"]["mrope_section"])},
        "rope_theta": 1000000.0,
        "sliding_window": text["max_position_embeddings"],
        "tie_word_embeddings": bool(text["tie_word_embeddings"]),
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "video_token_id": special_ids["video_token_id"],
        "vision_end_token_id": special_ids["vision_end_token_id"],
        "vision_start_token_id": special_ids["vision_start_token_id"],
        "vision_token_id": special_ids["vision_token_id"],
        "vocab_size": vocab_size,
        "vision_config": {
            **vision,
            "fullatt_block_indexes": list(vision["fullatt_block_indexes"]),
            "hidden_act": "silu",
            "model_type": "qwen2_5_vl",
            "spatial_patch_size": vision["patch_size"],
            "tokens_per_second": 2,
        },
    }


def _build_qwen_model(flat: dict):
    """A stock transformers Qwen2.5-VL built from the flat fields (structured config in 4.52+)."""
    text_keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
        "rms_norm_eps", "use_cache", "use_sliding_window", "sliding_window", "max_window_layers",
        "attention_dropout", "rope_theta", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    )
    text = {k: flat[k] for k in text_keys}
    text["rope_scaling"] = dict(flat["rope_scaling"])
    vision = {k: v for k, v in flat["vision_config"].items() if k != "model_type"}
    vision["in_channels"] = vision.get("in_chans", 3)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=flat["image_token_id"],
        video_token_id=flat["video_token_id"],
        vision_start_token_id=flat["vision_start_token_id"],
        vision_end_token_id=flat["vision_end_token_id"],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _load_kontext_transformer(kontext_dir: Path):
    """(config dict, state dict) of ``kontext_dir/transformer`` read straight from its files."""
    tdir = Path(kontext_dir) / "transformer"
    config = json.loads((tdir / "config.json").read_text(encoding="utf-8"))
    index = tdir / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        shards = ["diffusion_pytorch_model.safetensors"]
    state: dict = {}
    for shard in shards:
        state.update(load_file(str(tdir / shard)))
    return config, state


def _write_sharded_safetensors(d: Path, state: dict, max_shard_bytes: int) -> list[str]:
    """Greedy sharding in key order: ``model-0000i-of-0000N.safetensors`` + the index JSON."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    names = []
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in keys}, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(d / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def build_gie_checkpoint(path: Path, kontext_dir: Path | None = None, seed: int = 1,
                         max_shard_size: str = "200KB") -> Path:
    """Save a tiny checkpoint in the RELEASED GPT-Image-Edit layout at ``path`` and return it.

    The layout of ``UnivaQwen2p5VLForConditionalGeneration.save_pretrained``: a flat (pre-4.52)
    Qwen2.5-VL ``config.json`` plus ``denoise_tower`` (flux denoiser, mlp2x_gelu connector,
    the denoiser's diffusers config); sharded safetensors with old-layout names (``visual.*``,
    ``model.*``, ``lm_head.weight``, ``denoise_tower.denoise_projector.{0,2}.*``,
    ``denoise_tower.denoiser.*``) and ``model.safetensors.index.json``; the Qwen tokenizer,
    chat template and ``preprocessor_config.json``; ``generation_config.json``.

    The denoiser is ``kontext_dir``'s transformer with small random noise on every tensor (a
    "fine-tuned" Kontext that differs from stock) when ``kontext_dir`` is given, else a fresh
    random ``FluxTransformer2DModel``. All random values come from ``seed``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special_ids = _qwen_special_ids()
    vocab_size = _round_up(len(_qwen_tokenizer()), 64)  # padded like the real 151665 -> 152064
    flat = _qwen_flat_config(vocab_size, special_ids)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    qwen = _build_qwen_model(flat)
    state = {_to_released_name(k): v.detach().clone() for k, v in qwen.state_dict().items()}
    del qwen
    in_dim, out_dim = TINY_CONNECTOR["input_hidden_size"], TINY_CONNECTOR["output_hidden_size"]
    state.update(_random_projector(in_dim, out_dim, gen))  # drawn before the denoiser's noise (same seeds as before)
    denoiser_config, denoiser_state = _tiny_denoiser(kontext_dir, gen)
    if denoiser_config["joint_attention_dim"] != out_dim:
        raise ValueError(
            f"connector output is {out_dim} but the denoiser's joint_attention_dim is "
            f"{denoiser_config['joint_attention_dim']}"
        )
    for k, v in denoiser_state.items():
        state["denoise_tower.denoiser." + k] = v
    _write_gie_configs(path, flat, special_ids, in_dim, out_dim, denoiser_config)
    _write_sharded_safetensors(path, state, _parse_size(max_shard_size))
    _save_qwen_processor_files(path)
    return path


def _random_projector(in_dim: int, out_dim: int, gen) -> dict:
    """The released connector's ``mlp2x_gelu`` weights (``denoise_projector.{0,2}``), small random values."""
    std = 0.02
    return {
        "denoise_tower.denoise_projector.0.weight": torch.randn(3 * out_dim, in_dim, generator=gen) * std,
        "denoise_tower.denoise_projector.0.bias": torch.randn(3 * out_dim, generator=gen) * std,
        "denoise_tower.denoise_projector.2.weight": torch.randn(out_dim, 3 * out_dim, generator=gen) * std,
        "denoise_tower.denoise_projector.2.bias": torch.randn(out_dim, generator=gen) * std,
    }


def _tiny_denoiser(kontext_dir: Path | None, gen) -> tuple[dict, dict]:
    """(config, state) of the checkpoint's denoiser: ``kontext_dir``'s transformer with small
    noise on every float tensor (a "fine-tuned" Kontext), else a fresh random one."""
    if kontext_dir is not None:
        config, state = _load_kontext_transformer(Path(kontext_dir))
        return config, {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
                        for k, v in state.items()}
    denoiser = FluxTransformer2DModel(**TINY_TRANSFORMER)
    return json.loads(denoiser.to_json_string()), {k: v.detach().clone() for k, v in denoiser.state_dict().items()}


def _write_gie_configs(path: Path, flat: dict, special_ids: dict, in_dim: int, out_dim: int, denoiser_config: dict) -> None:
    """``config.json`` (flat Qwen2.5-VL config + ``denoise_tower``) and ``generation_config.json``
    as the release has them."""
    config = {
        **flat,
        "architectures": ["UnivaQwen2p5VLForConditionalGeneration"],
        "model_type": "univa_qwen2p5vl",
        "transformers_version": "4.50.0",
        "denoise_tower": {
            "denoiser_type": "flux",
            "denoise_projector_type": "mlp2x_gelu",
            "input_hidden_size": in_dim,
            "output_hidden_size": out_dim,
            "denoiser_config": denoiser_config,
        },
    }
    _write_json(path / "config.json", config)
    _write_json(
        path / "generation_config.json",
        {
            "bos_token_id": special_ids["bos_token_id"],
            "do_sample": True,
            "eos_token_id": [special_ids["eos_token_id"], special_ids["pad_token_id"]],
            "pad_token_id": special_ids["pad_token_id"],
            "repetition_penalty": 1.05,
            "temperature": 0.1,
            "top_k": 1,
            "top_p": 0.001,
            "transformers_version": "4.50.0",
        },
    )


# --------------------------------------------------------------------------------------------
# The whole set, cached
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyModelSet:
    """Paths of a built tiny model set (see :func:`build_tiny_model_set`)."""

    root: Path
    kontext_dir: Path  # FLUX.1-Kontext-dev diffusers directory
    gie_dir: Path  # released GPT-Image-Edit checkpoint directory
    tokenizers: TinyTokenizerPaths


def _set_version() -> str:
    """Marker contents: layout version, a hash of the tiny configs, the transformers major.

    transformers 4 and 5 write different tokenizer files, so a set built by one is rebuilt by
    the other; editing ``tiny_configs`` also invalidates the cache.
    """
    configs = json.dumps(
        [TINY_TRANSFORMER, TINY_VAE, TINY_SCHEDULER, TINY_CLIP_TEXT, TINY_T5, TINY_QWEN_TEXT,
         TINY_QWEN_VISION, TINY_CONNECTOR, QWEN_PREPROCESSOR_CONFIG, list(_EDIT_CORPUS)],
        sort_keys=True, default=list,
    )
    digest = hashlib.sha256(configs.encode()).hexdigest()[:16]
    major = transformers.__version__.split(".")[0]
    return f"{TINY_LAYOUT_VERSION} configs={digest} transformers={major}"


def _layout(root: Path) -> TinyModelSet:
    tok = root / "tokenizers"
    return TinyModelSet(
        root=root,
        kontext_dir=root / "kontext",
        gie_dir=root / "gie",
        tokenizers=TinyTokenizerPaths(clip=tok / "clip", t5=tok / "t5", qwen=tok / "qwen"),
    )


def _is_complete(root: Path, version: str) -> bool:
    marker = root / MARKER_NAME
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == version


def build_tiny_model_set(root: Path) -> TinyModelSet:
    """Build (or reuse) the whole tiny set under ``root`` and return its paths.

    Idempotent: a ``.complete`` marker holding the set's version string means the set is reused
    as is. Otherwise everything is built in a temporary sibling directory and swapped into place
    (:func:`gie_core.files.atomic_folder`), so an interrupted build never leaves a half set. A
    ``root`` that exists with other contents and no marker is refused rather than deleted.
    """
    root = Path(root).expanduser()
    version = _set_version()
    if _is_complete(root, version):
        return _layout(root)
    if root.exists():
        stale = (root / MARKER_NAME).is_file() or not any(root.iterdir())
        if not stale:
            raise FileExistsError(
                f"tiny model root {root} exists and is not a tiny model set (no {MARKER_NAME} "
                "marker); remove it or choose another directory"
            )
    # another process may finish the same build meanwhile: then its set is kept and ours dropped
    with atomic_folder(root, fsync=False, keep_existing=lambda: _is_complete(root, version)) as tmp:
        built = _layout(tmp)
        build_tokenizers(tmp / "tokenizers")
        build_kontext_dir(built.kontext_dir, seed=0)
        build_gie_checkpoint(built.gie_dir, kontext_dir=built.kontext_dir, seed=1)
        (tmp / MARKER_NAME).write_text(version + "\n", encoding="utf-8")
    return _layout(root)


def build_tiny_lora(kontext_dir: Path, out_dir: Path, name: str = "tiny_lora.safetensors") -> Path:
    """A rank-4 LoRA on the tiny Kontext transformer's attention, made with peft and saved as
    diffusers' ``FluxKontextPipeline.save_lora_weights`` writes it (non-zero, so it changes outputs)."""
    t = FluxTransformer2DModel.from_pretrained(Path(kontext_dir) / "transformer", local_files_only=True, use_safetensors=True)
    t.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in t.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    FluxLoraLoaderMixin.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(t), weight_name=name)
    return Path(out_dir) / name


def default_tiny_root() -> Path:
    """Where the demo mode caches the tiny set.

    ``$GIE_CACHE_DIR/tiny-v1`` if that variable is set, else
    ``$XDG_CACHE_HOME/gpt-image-edit/tiny-v1``, else ``~/.cache/gpt-image-edit/tiny-v1``.
    """
    if os.environ.get("GIE_CACHE_DIR"):
        return Path(os.environ["GIE_CACHE_DIR"]).expanduser() / "tiny-v1"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "gpt-image-edit" / "tiny-v1"


__all__ = [
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "QWEN_PREPROCESSOR_CONFIG",
    "QWEN_SPECIAL_TOKENS",
    "TinyModelSet",
    "TinyTokenizerPaths",
    "build_gie_checkpoint",
    "build_kontext_dir",
    "build_tiny_lora",
    "build_tiny_model_set",
    "build_tokenizers",
    "default_tiny_root",
]
