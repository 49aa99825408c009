"""GPT-Image-Edit engine: Qwen2.5-VL + T5 conditioning fused into FLUX.1 Kontext [dev].

A plain library (torch, diffusers, transformers); it never imports ComfyUI. Progress and
interruption come in as callbacks.
"""

__version__ = "0.1.0"
