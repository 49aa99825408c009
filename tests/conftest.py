"""Session-wide test setup: offline Hugging Face libraries, one thread, the tiny model set.

The environment variables are set at import, before any test module imports
``huggingface_hub`` / ``transformers`` / ``diffusers``, so nothing can reach the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# 2-core machines: two threads make a 20 ms tiny call swing up to ~1 s.
torch.set_num_threads(1)

# Headless Chromium for the page tests (Debian's chromium through Playwright for Python; never
# `playwright install`, which downloads a browser build).
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


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


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module, or a skip saying what is missing. Module-scoped:
    Playwright's sync API keeps an event loop running while its browser is open, and a later
    module's ``asyncio.run`` (the web-extension route tests) refuses to start inside it."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; never `playwright install`)")
    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()
    pw.stop()
