"""Weights and file formats: how a part's source plus a storage choice becomes a loaded module.

``parts`` is the one way in. Below it: ``reader`` (safetensors streaming), ``loading`` (the
released checkpoint and diffusers folders), ``single_file`` (BFL / ComfyUI single files),
``gguf``, ``quantize`` (fp8, bitsandbytes), ``lora``; ``convert`` writes ComfyUI files.

transformers and diffusers are imported inside the functions that build their models (marked
``# start-up``): ``gie-edit --help``, ``gie-convert --help`` and ComfyUI's start import these
modules, and those imports would slow them by 1-8 s.
"""
