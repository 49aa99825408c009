"""The whole edit in one object: encode (Qwen-VL, T5, CLIP), fuse, sample, and optional pad/crop.

Offload modes, for cards smaller than the models:
- ``none``: every part stays on the device;
- ``model``: parts live on the CPU and visit the device one at a time (the encoders leave
  before the transformer arrives);
- ``sequential``: as ``model``, and the transformer itself streams its blocks to the device
  one group at a time (diffusers group offloading): the mode for 24 GB cards at 1 MP.

Weights come in through :mod:`gie_core.weights.parts` (one way in: this module names the
sources, never a file format). Lighter weights: ``transformer_quantize="fp8"`` / ``qwen_quantize``
("fp8", or bitsandbytes "int8"/"nf4"), or a GGUF transformer file.
Faster sampling (:mod:`gie_core.engine.acceleration`): ``cache``, ``attention``, ``compile`` of each
edit. Many edits with one load: :meth:`EditPipeline.encode` once per image and instruction,
then :meth:`EditPipeline.render` per seed (what ``gie-edit --jobs`` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from gie_core.engine.conditioning import Conditioning
from gie_core.engine.conversation import Conversation
from gie_core.engine.connector import Connector, fuse
from gie_core.engine.components import Placement, fixed_device
from gie_core.checks import check_int
from gie_core.constants import (
    ANSWER_MAX_NEW_TOKENS,
    DEFAULT_ROUTE,
    LOAD_DEFAULTS,
    SEED_RANGE,
    TASK_HEAD_TOKEN,
)
from gie_core.engine.encoders import QwenVLEncoder, TextEncoders, check_instruction
from gie_core.imaging.images import ImageLike, prepare_reference, to_pil, to_rgb, to_tensor
from gie_core.weights.parts import (
    LoadPlan,
    Source,
    check_load,
    check_quantization,
    load,
    load_part,
    load_text_encoders,
    require_source,
    resolve_source,
    scheduler_from,
)
from gie_core.engine.modes import DEFAULT_FUSION_MODE, fusion_mode
from gie_core.imaging.ratio import PadRecord, apply_padding, crop_padding
from gie_core.weights.lora import activated
from gie_core.engine.request import EditRequest, resolve_device, resolve_edit
from gie_core.engine.sampler import InterruptFn, KontextModels, ProgressFn, encode_reference, sample
from gie_core.engine.taskhead import Route, TaskHead, assistant_hidden, check_route
from gie_core.engine.taskhead import route as route_turn


@dataclass
class EncodedEdit:
    """One edit (an image and instruction, or a conversation turn), encoded once: what any number
    of seeds of it are sampled from."""

    request: EditRequest
    positive: Conditioning
    negative: Conditioning | None
    reference_latents: list[torch.Tensor]  # each [B, 16, h, w]: normalised VAE latents of a condition image, on the CPU
    pad_record: PadRecord | None
    conversation: Conversation | None = None  # a turn's conversation, its user turn waiting for the edit


@dataclass
class EditResult:
    images: list[Image.Image]
    tensor: torch.Tensor  # [B, H, W, 3] in 0..1 (after crop-back when snapping)
    pad_record: PadRecord | None = None
    conditioning: Conditioning | None = None
    info: dict = field(default_factory=dict)
    conversation: Conversation | None = None  # a turn's conversation with the edit (the first image) as the reply


@dataclass
class AnswerResult:
    """A text reply to a turn, and the conversation with it as the assistant's turn."""

    text: str
    conversation: Conversation

    def __str__(self) -> str:
        return self.text


@dataclass
class TurnResult:
    """One conversation turn: how it was routed, and its edit or its answer."""

    route: Route
    conversation: Conversation
    edit: EditResult | None = None
    answer: str | None = None


class EditPipeline:
    """Qwen-VL + T5 conditioning fused into FLUX.1 Kontext, with offloading."""

    def __init__(
        self,
        *,
        transformer,
        vae,
        scheduler,
        text: TextEncoders | None = None,
        qwen: QwenVLEncoder | None = None,
        connector: Connector | None = None,
        device: str | torch.device | None = None,
        offload: str = "none",
        loras: tuple[tuple[str, float], ...] = (),
        task_head: TaskHead | None = None,
    ):
        self.loras = tuple(loras)  # (adapter name, strength), activated for each sampling run
        self.task_head = task_head  # the generate-or-answer head; None: "auto" routes edit
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.text, self.qwen, self.connector = text, qwen, connector
        self.placement = Placement(resolve_device(device), offload)
        self.device, self.offload = self.placement.device, offload
        for m in self._modules():
            if not fixed_device(m):
                m.to(self.device if offload == "none" else "cpu")

    def _modules(self):
        mods = [self.transformer, self.vae, self.connector]
        if self.text is not None:
            mods += [self.text.clip, self.text.t5]
        if self.qwen is not None:
            mods.append(self.qwen.model)
        mods.append(self.task_head)
        return [m for m in mods if m is not None]

    def on_device(self, *modules):
        """Bring modules to the device for a block (offload modes send them back after)."""
        return self.placement.use(*modules)

    # ------------------------------------------------------------------
    @classmethod
    def from_paths(
        cls,
        *,
        device: str | torch.device | None = None,
        offload: str = LOAD_DEFAULTS["library"].offload,
        **sources,
    ) -> EditPipeline:
        """Load what the fusion mode needs from a GPT-Image-Edit directory, a FLUX.1-Kontext
        directory and/or single files (single files override the directories' parts): the
        keyword arguments of :func:`plan_paths`, which checks every one before a weight is read.

        The transformer is the single file when given (a ``.gguf`` one is kept quantised), else the
        GPT-Image-Edit fine-tune, else the Kontext directory's stock one. ``connector_file``
        replaces the checkpoint's connector; ``lora_files`` are ``(path, strength)`` LoRAs
        applied to the transformer for every edit; with ``qwen_file`` and ``connector_file`` the
        VLM modes run from split files without the checkpoint folder. ``transformer_quantize``
        / ``qwen_quantize`` store those parts lighter (rows of
        :data:`gie_core.weights.quantize.STORAGE_TABLE`); LoRAs and the connector work on top of
        every choice. ``offload`` as :class:`gie_core.engine.components.Placement` takes it.
        """
        return cls.from_plan(plan_paths(device=device, **sources), device=device, offload=offload)

    @classmethod
    def from_plan(cls, loads: PipelineLoads, *, device: str | torch.device | None = None,
                  offload: str = LOAD_DEFAULTS["library"].offload) -> EditPipeline:
        """Load the parts of a checked :class:`PipelineLoads` (see :func:`plan_paths`)."""
        plans = loads.plans
        loaded = {name: load(plan) for name, plan in plans.items() if name not in ("clip", "t5")}  # task_head too
        text = load_text_encoders(plans["clip"], plans.get("t5"))
        transformer = loaded["transformer"].module
        loras = tuple((load_part("lora", path, transformer=transformer).adapter, float(strength))
                      for path, strength in loads.loras)
        module = {name: part.module for name, part in loaded.items()}
        return cls(
            transformer=transformer, vae=module["vae"], scheduler=scheduler_from(loads.scheduler_source), text=text,
            qwen=module.get("qwen"), connector=module.get("connector"), device=device, offload=offload, loras=loras,
            task_head=module.get("task_head"),
        )

    # ------------------------------------------------------------------
    def conditioning(self, images: ImageLike, instruction: str, mode: str = DEFAULT_FUSION_MODE) -> Conditioning:
        """Encode and fuse (image, instruction) into Kontext conditioning for ``mode``."""
        check_instruction(instruction)
        return self._fused(lambda queries: self.qwen.encode(images, instruction, queries=queries), instruction, mode)

    def conversation_conditioning(self, conversation: Conversation, mode: str = DEFAULT_FUSION_MODE) -> Conditioning:
        """Kontext conditioning of a conversation's waiting turn, as the app builds it: Qwen2.5-VL
        reads the whole conversation (every image, the system block removed), T5 and CLIP the
        current turn's text. A one-turn one-image conversation in the "edit" layout gives exactly
        :meth:`conditioning`'s result."""
        if not conversation.pending:
            raise ValueError("the conversation has no waiting user turn to edit for; add the instruction first")
        instruction = check_instruction(conversation.current_turn().text)
        return self._fused(lambda queries: self.qwen.encode_conversation(conversation, queries=queries), instruction, mode)

    def _fused(self, encode_vlm, instruction: str, mode: str) -> Conditioning:
        """Fuse ``encode_vlm(queries)`` (Qwen features, when the mode reads them) with T5/CLIP of
        ``instruction`` into ``mode``'s conditioning, on the CPU."""
        spec = fusion_mode(mode)
        vlm = None
        if spec.needs_qwen:
            if self.qwen is None or self.connector is None:
                raise ValueError(f"fusion mode '{mode}' needs the Qwen-VL encoder and connector (load a GPT-Image-Edit checkpoint)")
            queries = self.connector.queries if spec.queries else None
            with self.on_device(self.qwen.model):
                vlm = encode_vlm(queries)
        if self.text is None:
            raise ValueError("no CLIP/T5 text encoders are loaded")
        with self.on_device(self.text.clip, self.text.t5):
            text = self.text.encode(instruction, with_t5=spec.needs_t5)
        with self.on_device(self.connector):
            cond = fuse(mode, self.connector, vlm, text)  # fuse moves features to the connector's device
        return cond.to("cpu")

    def encode(
        self,
        image: ImageLike | None,
        instruction: str,
        *,
        image2: ImageLike | None = None,
        conversation: Conversation | None = None,
        request: EditRequest | None = None,
        negative_instruction: str | None = None,
        **options,
    ) -> EncodedEdit:
        """Check, pad (when snapping) and encode ``image`` + ``instruction`` once: the conditioning
        (and the negative one with true CFG) and the prepared reference, ready for
        :meth:`render` with any seed. ``request`` or ``options`` as for :meth:`edit`; with
        ``image2`` or a ``conversation`` the edit is a conversation turn (:meth:`encode_turn`)."""
        if image2 is not None or conversation is not None:
            return self.encode_turn(conversation, instruction, [im for im in (image, image2) if im is not None],
                                    request=request, negative_instruction=negative_instruction, **options)
        if image is None:
            raise ValueError("the edit has no input image; give one (or continue a conversation)")
        check_instruction(instruction)
        checked = to_tensor(image, "input image")  # validates type, mode, size and values
        n_images = checked.shape[0]
        if request is None:
            request = _resolve_options(checked, n_images, options)
        elif options:
            raise TypeError(f"pass either a request or options, not both (got {', '.join(sorted(options))})")
        elif (request.input_width, request.input_height, request.n_images) != (checked.shape[2], checked.shape[1], n_images):
            raise ValueError(
                f"the request was resolved for {request.n_images} image(s) of {request.input_width}x{request.input_height} "
                f"but the image is {n_images} of {checked.shape[2]}x{checked.shape[1]}"
            )
        # Keep PIL inputs as PIL (in RGB): the reference is then resized exactly as diffusers does.
        background = request.pad_color if request.pad is not None and request.pad_color != "edge" else "white"
        if isinstance(image, Image.Image):
            images = to_rgb(image, background)
        elif isinstance(image, (list, tuple)):
            images = [to_rgb(im, background) for im in image]
        else:
            images = checked
        record = request.pad
        if record is not None:  # padded exactly as the request was sized
            images = apply_padding(
                images if isinstance(images, Image.Image) else to_tensor(images, "input image"), record, request.pad_color
            )
        positive = self.conditioning(images, instruction, request.mode)
        negative = None
        if request.do_true_cfg:
            negative = self.conditioning(images, negative_instruction or " ", request.mode)
        reference = prepare_reference(images, request.reference_resize, resample=request.reference_resample)
        with self.on_device(self.vae):
            latents = encode_reference(self.vae, reference, self.device).cpu()  # once, for every seed
        return EncodedEdit(request, positive, negative, [latents], record)

    def encode_turn(
        self,
        conversation: Conversation | None,
        instruction: str,
        images=(),
        *,
        request: EditRequest | None = None,
        negative_instruction: str | None = None,
        **options,
    ) -> EncodedEdit:
        """Encode an edit turn of a conversation (a new one when ``conversation`` is None): the user
        turn ``instruction`` + ``images`` (0-2) is added; Qwen reads the whole conversation, and
        every image of it is a Kontext condition image at its own size (each resized by the
        request's reference rule, never stacked). An automatic output size follows this turn's
        images (the last turn with images when this one has none): the one-image rule, or the
        app's rule for two (:func:`gie_core.imaging.ratio.multi_image_output_size`). A conversation
        with no image at all is text to image (no Kontext reference), sized as a 1024x1024 input
        would be, as the app's default."""
        check_instruction(instruction)
        base = conversation if conversation is not None else Conversation()
        if not isinstance(base, Conversation):
            raise TypeError(f"conversation must be a Conversation, not {type(base).__name__}")
        conv = base.add_user(instruction, images)
        conv.check_edit_fits()
        sizes = conv.sizing_sizes()
        if request is None:
            request = _resolve_options(sizes[0], 1, options, more_images=sizes[1:])
        elif options:
            raise TypeError(f"pass either a request or options, not both (got {', '.join(sorted(options))})")
        if request.pad is not None or request.n_images != 1:
            raise ValueError("a conversation turn edits one image at a time at its own size: no snap, no image batch")
        positive = self.conversation_conditioning(conv, request.mode)
        negative = None
        if request.do_true_cfg:
            negative = self.conversation_conditioning(base.add_user(negative_instruction or " ", images), request.mode)
        latents = []
        with self.on_device(self.vae):
            for im in conv.images():  # once, for every seed
                ref = prepare_reference(im, request.reference_resize, resample=request.reference_resample)
                latents.append(encode_reference(self.vae, ref, self.device).cpu())
        return EncodedEdit(request, positive, negative, latents, None, conv)

    def render(
        self,
        encoded: EncodedEdit,
        *,
        seed: int | None = None,
        progress: ProgressFn | None = None,
        interrupt: InterruptFn | None = None,
    ) -> EditResult:
        """Sample an encoded edit (with ``seed`` instead of the request's, when given) and crop
        the padding back when snapping."""
        request = encoded.request
        if seed is not None and seed != request.seed:
            request = dataclasses.replace(request, seed=check_int("seed", seed, *SEED_RANGE))
        # only take charge of the adapters when this pipeline was given LoRAs
        loras = activated(self.transformer, self.loras) if self.loras else contextlib.nullcontext()
        with self.on_device(self.transformer, self.vae), loras:
            out = sample(
                KontextModels(self.transformer, self.vae, self.scheduler), encoded.positive, None, request,
                reference_latents=list(encoded.reference_latents), negative=encoded.negative, device=self.device,
                progress=progress, interrupt=interrupt,
            ).cpu()
        if encoded.pad_record is not None:
            out = crop_padding(out, encoded.pad_record)
        info = {"width": request.width, "height": request.height, "mode": request.mode, "request": request}
        images = to_pil(out)
        conversation = encoded.conversation.add_assistant_image(images[0]) if encoded.conversation is not None else None
        return EditResult(images, out, encoded.pad_record, encoded.positive, info, conversation)

    def edit(
        self,
        image: ImageLike | None,
        instruction: str,
        *,
        image2: ImageLike | None = None,
        conversation: Conversation | None = None,
        request: EditRequest | None = None,
        negative_instruction: str | None = None,
        progress: ProgressFn | None = None,
        interrupt: InterruptFn | None = None,
        **options,
    ) -> EditResult:
        """Edit ``image`` by ``instruction``: ``pipe.edit(image, "make it winter", steps=4, seed=1)``.

        The run is one :class:`gie_core.engine.request.EditRequest`: pass a ``request`` from
        :func:`gie_core.engine.request.resolve_edit` (as ``gie-edit`` does, having checked everything
        before loading), or its keyword ``options``, which go to :func:`resolve_edit` once (the
        image's size and batch filled in): ``mode``, ``steps``, ``guidance``, ``seed``, ``width``/
        ``height`` or ``size`` = (width, height) (0 = follow the aspect; None = auto), ``batch_size``,
        ``true_cfg``, ``snap`` (a ratio set, e.g. "default": pad the image to the nearest ratio first
        and crop the padding from the result, back to the original size), ``pad_color``,
        ``reference_resize``, ``reference_resample``, ``cache`` ("magcache", "taylorseer:3", ...),
        ``attention`` ("sdpa", "flash", ...), ``compile``... Their defaults are ``resolve_edit``'s.
        ``negative_instruction``: the negative prompt for true CFG (" " when none is given).

        ``image2``: the app's optional Image 2 (``pipe.edit(person, "put the jacket from image 2 on
        the person in image 1", image2=jacket)``); ``conversation``: a
        :class:`gie_core.engine.conversation.Conversation` to continue (``image`` may then be None).
        Either makes the edit a conversation turn (see :meth:`encode_turn`) and the result carries
        ``conversation``, extended by this turn and its first image.
        """
        encoded = self.encode(image, instruction, image2=image2, conversation=conversation, request=request,
                              negative_instruction=negative_instruction, **options)
        return self.render(encoded, progress=progress, interrupt=interrupt)

    # ------------------------------------------------------------------
    # Answers and routing (the reference app's understanding branch and task head)
    # ------------------------------------------------------------------
    def ask(
        self,
        image: ImageLike | None,
        question: str,
        *,
        image2: ImageLike | None = None,
        conversation: Conversation | None = None,
        max_new_tokens: int = ANSWER_MAX_NEW_TOKENS,
    ) -> AnswerResult:
        """Answer ``question`` about ``image`` (and ``image2``), or continue ``conversation``, with
        the checkpoint's Qwen2.5-VL generating text as the app does (greedy, 128 new tokens by
        default). Reads Qwen's language-model head (on first use unless loaded with ``lm_head=True``)."""
        check_instruction(question)
        base = conversation if conversation is not None else Conversation()
        conv = base.add_user(question, [im for im in (image, image2) if im is not None])
        return self.answer_turn(conv, max_new_tokens)

    def answer_turn(self, conversation: Conversation, max_new_tokens: int = ANSWER_MAX_NEW_TOKENS) -> AnswerResult:
        """The text reply to a conversation's waiting user turn."""
        if self.qwen is None:
            raise ValueError("answers need the Qwen2.5-VL: load a GPT-Image-Edit checkpoint (or --qwen) and a VLM mode")
        with self.on_device(self.qwen.model):
            text = self.qwen.answer(conversation, max_new_tokens)
        return AnswerResult(text, conversation.add_assistant_text(text))

    def route(self, conversation: Conversation, mode: str = DEFAULT_ROUTE) -> Route:
        """Edit or answer the conversation's waiting turn: ``mode`` "edit"/"answer" force it;
        "auto" asks the task head (one Qwen forward), and edits when the checkpoint has none."""
        mode = check_route(mode)
        if mode != "auto" or self.task_head is None:
            return route_turn(mode, self.task_head)
        if self.qwen is None:
            raise ValueError("the task head reads Qwen2.5-VL features; load a GPT-Image-Edit checkpoint")
        with self.on_device(self.qwen.model):
            features = self.qwen.encode_conversation(conversation)
            hidden = assistant_hidden(features, self.qwen.role_token_position(features.input_ids, TASK_HEAD_TOKEN))
        with self.on_device(self.task_head):
            return route_turn(mode, self.task_head, hidden)

    def turn(
        self,
        conversation: Conversation | None,
        text: str,
        images=(),
        *,
        route: str = DEFAULT_ROUTE,
        max_new_tokens: int = ANSWER_MAX_NEW_TOKENS,
        progress: ProgressFn | None = None,
        interrupt: InterruptFn | None = None,
        **options,
    ) -> TurnResult:
        """One turn of the app's chat: add the user's ``text`` and ``images`` (0-2) to
        ``conversation``, route it (:meth:`route`), then edit (``options`` as for :meth:`edit`)
        or answer. The result carries the conversation extended by the reply."""
        check_instruction(text)
        check_route(route)
        base = conversation if conversation is not None else Conversation()
        pending = base.add_user(text, images)
        decision = self.route(pending, route)
        if decision.decision == "answer":
            answered = self.answer_turn(pending, max_new_tokens)
            return TurnResult(decision, answered.conversation, answer=answered.text)
        encoded = self.encode_turn(base, text, images, **options)
        result = self.render(encoded, progress=progress, interrupt=interrupt)
        return TurnResult(decision, result.conversation, edit=result)


# What the image itself decides, so EditPipeline.edit's options cannot set it.
_FROM_THE_IMAGE = ("image_width", "image_height", "n_images", "more_images")


def _resolve_options(checked, n_images: int, options: dict, more_images=()) -> EditRequest:
    """The :class:`EditRequest` of :meth:`EditPipeline.edit`'s keyword options: ``resolve_edit``'s
    keywords (``size`` = (width, height) as a shorthand), the image's size and batch added
    (``checked``: the image tensor [B, H, W, 3], or its (width, height))."""
    options = dict(options)
    known = set(inspect.signature(resolve_edit).parameters) - set(_FROM_THE_IMAGE)
    unknown = sorted(set(options) - known - {"size"})
    if unknown:
        raise TypeError(f"unknown edit option(s) {', '.join(unknown)}; the options are size and resolve_edit's: "
                        f"{', '.join(sorted(known))}")
    size = options.pop("size", None)
    if size is not None:
        if "width" in options or "height" in options:
            raise TypeError("give size=(width, height) or width/height, not both")
        options["width"], options["height"] = size
    width, height = (checked.shape[2], checked.shape[1]) if torch.is_tensor(checked) else checked
    return resolve_edit(image_width=width, image_height=height, n_images=n_images, more_images=more_images, **options)


# ----------------------------------------------------------------------
# What from_paths loads, checked first
# ----------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineLoads:
    """What :meth:`EditPipeline.from_paths` loads: one checked plan per part (nothing read yet)."""

    plans: dict[str, LoadPlan]  # transformer, vae, clip and, as the mode needs, t5, qwen, connector
    scheduler_source: Source | None  # the Kontext folder's scheduler, else FLUX's shipped one
    loras: tuple[tuple[str | os.PathLike, float], ...] = ()


def plan_paths(
    *,
    gie_dir: str | os.PathLike | None = None,
    kontext_dir: str | os.PathLike | None = None,
    transformer_file: str | os.PathLike | None = None,
    vae_file: str | os.PathLike | None = None,
    t5_file: str | os.PathLike | None = None,
    clip_file: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    connector_file: str | os.PathLike | None = None,
    lora_files: tuple[tuple[str | os.PathLike, float], ...] = (),
    mode: str = DEFAULT_FUSION_MODE,
    dtype: str | torch.dtype = LOAD_DEFAULTS["library"].dtype,
    device: str | torch.device | None = None,
    transformer_quantize: str = "none",
    qwen_quantize: str = "none",
    qwen_file: str | os.PathLike | None = None,
    qwen_tokenizer_dir: str | os.PathLike | None = None,
    task_head_file: str | os.PathLike | None = None,
    lm_head: bool = False,
) -> PipelineLoads:
    """Which source gives each part ``mode`` needs, every choice checked by
    :func:`gie_core.weights.parts.check_load` before a weight is read (``gie-edit`` calls this
    up front). ``tokenizer_dir``: a folder with ``tokenizer/`` (CLIP) and ``tokenizer_2/`` (T5)
    for single-file text encoders (default: ``kontext_dir``); ``qwen_tokenizer_dir``: the
    tokenizer of ``qwen_file`` (default: ``gie_dir``). ``task_head_file``: the generate-or-answer
    head (default: the checkpoint folder's ``task_head.safetensors`` / ``task_head_final.pt`` when it
    has one; without any, route "auto" edits). ``lm_head``: read Qwen's language-model head now
    (answers read it; a checkpoint folder's is otherwise read on first use)."""
    spec = fusion_mode(mode)
    run_device = resolve_device(device)
    check_quantization("transformer", transformer_quantize, run_device)
    check_quantization("qwen", qwen_quantize, run_device)
    gie_dir = require_source(gie_dir, "gie_dir") if gie_dir is not None else None
    kontext_dir = require_source(kontext_dir, "kontext_dir") if kontext_dir is not None else None
    common = {"dtype": dtype, "device": "cpu", "run_device": run_device}
    vlm = _plan_vlm(spec, mode, gie_dir, qwen_file, qwen_tokenizer_dir, connector_file, qwen_quantize, common, lm_head)
    if task_head_file is not None or (gie_dir is not None and "task_head" in gie_dir.holds):
        vlm["task_head"] = check_load("task_head", task_head_file or gie_dir, **common)
    missing = [part for part, given in (("transformer", transformer_file or gie_dir), ("vae", vae_file),
                                        ("clip", clip_file), ("t5", t5_file or not spec.needs_t5)) if not given]
    if kontext_dir is None and missing:
        raise ValueError(f"no FLUX.1-Kontext directory given (--kontext) and no single files for: {', '.join(sorted(missing))}")
    plans = {
        "transformer": check_load("transformer", transformer_file or gie_dir or kontext_dir, transformer_quantize, **common),
        "vae": check_load("vae", vae_file or kontext_dir, **common),
        **_plan_text(spec, kontext_dir, clip_file, t5_file if spec.needs_t5 else None, tokenizer_dir, common),
        **vlm,
    }
    for path, _ in lora_files:
        resolve_source(path, "lora")
    return PipelineLoads(plans, kontext_dir, tuple(lora_files))


def _plan_text(spec, kontext_dir, clip_file, t5_file, tokenizer_dir, common) -> dict[str, LoadPlan]:
    """CLIP (always: the pooled vector) and T5 (when the mode reads it), from single files with
    the tokenizers of ``tokenizer_dir`` (or the Kontext folder's), else from the Kontext folder."""
    tok_root = tokenizer_dir or (kontext_dir.path if kontext_dir is not None else None)
    if (clip_file is not None or t5_file is not None) and tok_root is None:
        raise ValueError(
            "single-file text encoders need their tokenizers: pass --tokenizers DIR "
            "(a FLUX.1 diffusers folder, or any folder with tokenizer/ (CLIP) and tokenizer_2/ (T5))"
        )

    def plan(part, file, sub):
        options = {"tokenizer_dir": Path(tok_root) / sub} if file is not None else {}
        return check_load(part, file or kontext_dir, **common, **options)

    plans = {"clip": plan("clip", clip_file, "tokenizer")}
    if spec.needs_t5:
        plans["t5"] = plan("t5", t5_file, "tokenizer_2")
    return plans


def _plan_vlm(spec, mode, gie_dir, qwen_file, qwen_tokenizer_dir, connector_file, qwen_quantize,
              common, lm_head: bool = False) -> dict[str, LoadPlan]:
    """Qwen2.5-VL and the connector for the VLM modes: split files, else the checkpoint's."""
    if spec.needs_qwen and gie_dir is None and not (qwen_file is not None and connector_file is not None):
        raise ValueError(
            f"fusion mode '{mode}' needs a GPT-Image-Edit checkpoint (--model), or its split files (--qwen and "
            "--connector); mode 't5' runs stock Kontext"
        )
    if qwen_file is not None and qwen_tokenizer_dir is None and gie_dir is None:
        raise ValueError("a single Qwen2.5-VL file needs its tokenizer: pass --qwen-tokenizer DIR (a Qwen2.5-VL "
                         "folder, or ComfyUI's comfy/text_encoders/qwen25_tokenizer)")
    plans = {}
    if connector_file is not None or spec.needs_qwen:
        plans["connector"] = check_load("connector", connector_file or gie_dir, **common)
    if lm_head and not spec.needs_qwen:
        raise ValueError(f"answers need the Qwen2.5-VL, which fusion mode '{mode}' does not load; use a VLM mode "
                         "(e.g. vlm+t5) with a GPT-Image-Edit checkpoint")
    if spec.needs_qwen:
        options = {"tokenizer_dir": qwen_tokenizer_dir or gie_dir.path} if qwen_file is not None else {}
        if lm_head:
            options["lm_head"] = True
        plans["qwen"] = check_load("qwen", qwen_file or gie_dir, qwen_quantize, **common, **options)
    return plans
