"""GPT-Image-Edit as ComfyUI nodes: thin faces over ``gie_core``.

Imports without ComfyUI (tests and tools use it directly); ComfyUI-specific calls live in
``nodes.comfy`` only, each with a plain fallback.
"""

from __future__ import annotations

from . import comfy, conversation, encode, loaders, ratio, rewrite, sampling, web_api

comfy.register_model_folder()
web_api.register()  # GET /gie/rules and /gie/pad_plan for web/gie.js, inside ComfyUI only

_NODES = {}
for _module in (loaders, encode, conversation, rewrite, sampling, ratio):
    _NODES.update(_module.NODES)

NODE_CLASS_MAPPINGS = {name: cls for name, (cls, _) in _NODES.items()}
# The pack's prefix on every display name, so search never mistakes ours for core nodes.
DISPLAY_PREFIX = "GIE "
NODE_DISPLAY_NAME_MAPPINGS = {name: DISPLAY_PREFIX + title for name, (_, title) in _NODES.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
