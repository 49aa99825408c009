"""The two-stage GPT-Image-Edit trainer (``gie-train``), on the ``gie_core`` engine.

Stage 1 trains only the connector (Qwen2.5-VL features -> Kontext context) against a frozen
FLUX.1 Kontext transformer; stage 2 trains the connector and a chosen set of transformer
parameters (the released image-branch attention set, all of them, or a LoRA).

Modules:
- :mod:`.config`: the options, their YAML/TOML files and command-line overrides;
- :mod:`.data`: ``data.txt`` and annotation reading, aspect-ratio buckets, region weights;
- :mod:`.cache`: precomputed encoder features and VAE latents;
- :mod:`.loss`: the flow-matching loss of the reference, as pure functions;
- :mod:`.trainable`: which parameters train (image-branch attention, full, LoRA);
- :mod:`.models`: loading the parts a run needs, the trained module;
- :mod:`.memory`: frozen weights in fp8 (layerwise casting), block swap (group offloading), the peak
  memory a run logs;
- :mod:`.attention`: the SDPA kernels the training step may use (``train.attention_kernels``);
- :mod:`.allocator`: the CUDA allocator setting ``gie-train`` makes, the reserved-memory margin of the plan;
- :mod:`.plan`: ``gie-train plan``, the GPU memory a run needs, before anything loads;
- :mod:`.engine`: what DDP / DeepSpeed / FSDP can do here, resuming on another number of processes;
- :mod:`.checkpoint`: atomic checkpoints, keep-last-K, resume;
- :mod:`.export`: files the engine's loaders and the ComfyUI nodes read;
- :mod:`.trainer`: the training loop.

Nothing here imports ComfyUI; the engine's encoders, connector, sampler and loaders are reused.
"""

from __future__ import annotations

from gie_core.train.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config"]
