"""Weights and file formats: how a part's source plus a storage choice becomes a loaded module.

``parts`` is the one way in. Below it: ``reader`` (safetensors streaming), ``loading`` (the
released checkpoint and diffusers folders), ``single_file`` (BFL / ComfyUI single files),
``gguf``, ``quantize`` (fp8, bitsandbytes), ``lora``; ``convert`` writes ComfyUI files.
"""
