"""ComfyUI entry point of the GPT-Image-Edit node pack (ComfyUI imports this folder as a package).

The engine, ``gie_core``, sits next to this file; when the pack was not pip-installed, this
folder is appended to ``sys.path`` so ``import gie_core`` finds it.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("gie_core") is None:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

if __package__:  # ComfyUI imports this folder as a package
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:  # a plain module: pytest collecting a checkout whose folder name is no identifier ("ci-main")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
