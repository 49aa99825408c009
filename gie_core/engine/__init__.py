"""The engine: one edit from a resolved request to pixels.

``request`` resolves and checks a run's values once; ``modes`` is the fusion-mode table;
``encoders``, ``connector`` and ``conditioning`` turn an image and an instruction into Kontext
conditioning; ``schedule`` and ``sampler`` run the steps (with ``acceleration``'s caches,
attention backends and compile); ``pipeline`` ties the parts together for one or many edits
(``jobs``); ``rewrite`` asks Qwen2.5-VL to rewrite an instruction; ``components`` places models
on devices.

diffusers and transformers are imported inside the functions that need them (marked
``# start-up``), so that ``gie-edit --help`` and ComfyUI's start do not pay for them.
"""
