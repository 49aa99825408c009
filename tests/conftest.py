"""Session-wide test setup: offline Hugging Face libraries, one thread, the tiny model set.

The environment variables are set at import, before any test module imports
``huggingface_hub`` / ``transformers`` / ``diffusers``, so nothing can reach the hub.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# 2-core machines: two threads make a 20 ms tiny call swing up to ~1 s.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """The whole tiny random model set (Kontext dir, released-layout GIE dir, tokenizers)."""
    from gie_core.testing.tiny import build_tiny_model_set

    return build_tiny_model_set(tmp_path_factory.mktemp("tiny") / "set")


@pytest.fixture(scope="session")
def kontext_dir(tiny_set):
    """A tiny FLUX.1-Kontext-dev diffusers directory."""
    return tiny_set.kontext_dir


@pytest.fixture(scope="session")
def gie_dir(tiny_set):
    """A tiny checkpoint in the released GPT-Image-Edit layout (its denoiser = perturbed Kontext)."""
    return tiny_set.gie_dir


@pytest.fixture(scope="session")
def tokenizer_dirs(tiny_set):
    """``TinyTokenizerPaths`` with the ``clip``, ``t5`` and ``qwen`` tokenizer directories."""
    return tiny_set.tokenizers
