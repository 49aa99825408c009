"""The whole edit in one object: encode (Qwen-VL, T5, CLIP), fuse, sample, and optional pad/crop.

Offload modes, for cards smaller than the models:
- ``none``: every part stays on the device;
- ``model``: parts live on the CPU and visit the device one at a time (the encoders leave
  before the transformer arrives);
- ``sequential``: as ``model``, and the transformer itself streams its blocks to the device
  one group at a time (diffusers group offloading): the mode for 24 GB cards at 1 MP.

Lighter weights (:mod:`gie_core.weights.quantize`): ``transformer_quantize="fp8"`` / ``qwen_quantize``
("fp8", or bitsandbytes "int8"/"nf4"), or a GGUF transformer file (:mod:`gie_core.weights.gguf`).
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

import torch
from PIL import Image

from gie_core.engine.conditioning import Conditioning
from gie_core.engine.connector import Connector, fuse
from gie_core.engine.components import Placement, default_scheduler, fixed_device, load_text_encoder_files
from gie_core.checks import check_int
from gie_core.constants import SEED_RANGE
from gie_core.engine.encoders import QwenVLEncoder, TextEncoders, check_instruction
from gie_core.imaging.images import ImageLike, prepare_reference, to_pil, to_rgb, to_tensor
from gie_core.weights.loading import load_gie_checkpoint, load_kontext_dir, parse_dtype
from gie_core.engine.modes import DEFAULT_FUSION_MODE, fusion_mode
from gie_core.imaging.ratio import PadRecord, apply_padding, crop_padding
from gie_core.engine.request import EditRequest, resolve_device, resolve_edit
from gie_core.engine.sampler import InterruptFn, KontextModels, ProgressFn, encode_reference, sample


@dataclass
class EncodedEdit:
    """One image and instruction, encoded once: what any number of seeds of it are sampled from."""

    request: EditRequest
    positive: Conditioning
    negative: Conditioning | None
    reference_latents: torch.Tensor  # [B, 16, h, w], normalised VAE latents of the reference, on the CPU
    pad_record: PadRecord | None


@dataclass
class EditResult:
    images: list[Image.Image]
    tensor: torch.Tensor  # [B, H, W, 3] in 0..1 (after crop-back when snapping)
    pad_record: PadRecord | None = None
    conditioning: Conditioning | None = None
    info: dict = field(default_factory=dict)


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
    ):
        self.loras = tuple(loras)  # (adapter name, strength), activated for each sampling run
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
        return [m for m in mods if m is not None]

    def on_device(self, *modules):
        """Bring modules to the device for a block (offload modes send them back after)."""
        return self.placement.use(*modules)

    # ------------------------------------------------------------------
    @classmethod
    def from_paths(
        cls,
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
        dtype: str | torch.dtype = "bf16",
        device: str | torch.device | None = None,
        offload: str = "none",
        transformer_quantize: str = "none",
        qwen_quantize: str = "none",
        qwen_file: str | os.PathLike | None = None,
        qwen_tokenizer_dir: str | os.PathLike | None = None,
    ) -> EditPipeline:
        """Load what ``mode`` needs from a GPT-Image-Edit directory, a FLUX.1-Kontext directory
        and/or single files (single files override the directory's parts).

        The transformer is the GPT-Image-Edit fine-tune when ``gie_dir`` is given (else the
        single file, else the Kontext directory's stock one). ``tokenizer_dir`` is a folder with
        ``tokenizer/`` (CLIP) and ``tokenizer_2/`` (T5) for single-file text encoders (a
        FLUX.1 diffusers directory has them). ``connector_file`` replaces the checkpoint's
        connector (e.g. one trained by ``gie-train``); ``lora_files`` are ``(path, strength)``
        LoRAs applied to the transformer for every edit. ``qwen_file`` is a single Qwen2.5-VL file
        (``gie-convert``'s, or ComfyUI's stock ``qwen_2.5_vl_7b*.safetensors``), its tokenizer from
        ``qwen_tokenizer_dir`` (else ``gie_dir``); with it and ``connector_file``, the VLM modes run
        from split files without the checkpoint folder.

        ``transformer_file`` may be a GGUF file (``.gguf``: community Q8/Q5/Q4 Kontext files, or
        one written by ``gie-convert``), kept quantised. ``transformer_quantize`` ("none"/"fp8")
        and ``qwen_quantize`` ("none"/"fp8"/"int8"/"nf4") store those parts lighter (see
        :mod:`gie_core.weights.quantize`); LoRAs and the connector work on top of every choice.
        """
        from gie_core.weights import single_file as sf
        from gie_core.weights.gguf import is_gguf, load_gguf_transformer
        from gie_core.weights.quantize import check_quantization, prepare_fp8_storage, quantization

        spec = fusion_mode(mode)
        dtype = parse_dtype(dtype)
        run_device = resolve_device(device)
        transformer_quantize = check_quantization("transformer", transformer_quantize, run_device)
        qwen_quantize = check_quantization("qwen", qwen_quantize, run_device)
        if transformer_file is not None and is_gguf(transformer_file) and transformer_quantize != "none":
            raise ValueError(f"the transformer {transformer_file} is a GGUF file, quantised already; "
                             f"drop the transformer quantization '{transformer_quantize}'")
        load_dev = "cpu"
        needs_vlm, needs_t5 = spec.needs_qwen, spec.needs_t5
        split_vlm = qwen_file is not None and connector_file is not None
        if needs_vlm and gie_dir is None and not split_vlm:
            raise ValueError(
                f"fusion mode '{mode}' needs a GPT-Image-Edit checkpoint (--model), or its split files (--qwen and "
                "--connector); mode 't5' runs stock Kontext"
            )
        if qwen_file is not None:
            if qwen_tokenizer_dir is None and gie_dir is None:
                raise ValueError("a single Qwen2.5-VL file needs its tokenizer: pass --qwen-tokenizer DIR (a Qwen2.5-VL "
                                 "folder, or ComfyUI's comfy/text_encoders/qwen25_tokenizer)")
            if quantization(qwen_quantize).kind == "bnb":
                raise ValueError(f"Qwen quantization '{qwen_quantize}' (bitsandbytes) needs the checkpoint folder; a single "
                                 "Qwen file takes none or fp8")
        qwen = connector = transformer = None
        if gie_dir is not None:
            parts = ["transformer"] if transformer_file is None else []
            if needs_vlm:
                parts += ["encoder", "connector"]
            if connector_file is not None and "connector" in parts:
                parts.remove("connector")
            if qwen_file is not None and "encoder" in parts:
                parts.remove("encoder")
            bnb_qwen = "encoder" in parts and quantization(qwen_quantize).kind == "bnb"
            if bnb_qwen:  # bitsandbytes quantises onto the run device: load the encoder there
                parts.remove("encoder")
                qwen = load_gie_checkpoint(gie_dir, dtype=dtype, device=run_device, parts=("encoder",),
                                           qwen_quantize=qwen_quantize).encoder
            ck = load_gie_checkpoint(gie_dir, dtype=dtype, device=load_dev, parts=tuple(parts),
                                     transformer_quantize=transformer_quantize,
                                     qwen_quantize="none" if bnb_qwen else qwen_quantize)
            connector, transformer = ck.connector, ck.transformer
            if not bnb_qwen:
                qwen = ck.encoder
        if connector_file is not None:
            from gie_core.weights.loading import load_connector

            connector = load_connector(connector_file, dtype=dtype, device=load_dev)
        if qwen_file is not None and needs_vlm:
            qwen = sf.load_qwen_file(qwen_file, tokenizer_dir=qwen_tokenizer_dir or gie_dir, dtype=dtype, device=load_dev)
            if qwen_quantize == "fp8":
                prepare_fp8_storage(qwen.model, dtype, "qwen")
        if transformer_file is not None:
            if is_gguf(transformer_file):
                transformer = load_gguf_transformer(transformer_file, dtype=dtype, device=load_dev)
            else:
                transformer = sf.load_bfl_transformer(transformer_file, dtype=dtype, device=load_dev)
                if quantization(transformer_quantize).kind == "layerwise":
                    prepare_fp8_storage(transformer, dtype, "transformer")

        k_parts = []
        if transformer is None:
            k_parts.append("transformer")
        if vae_file is None:
            k_parts.append("vae")
        k_parts.append("scheduler")
        if clip_file is None:
            k_parts.append("clip")
        if needs_t5 and t5_file is None:
            k_parts.append("t5")
        comps = None
        if kontext_dir is not None:
            comps = load_kontext_dir(kontext_dir, dtype=dtype, device=load_dev, parts=tuple(k_parts),
                                     transformer_quantize=transformer_quantize)
        elif set(k_parts) - {"scheduler"}:
            missing = ", ".join(sorted(set(k_parts) - {"scheduler"}))
            raise ValueError(f"no FLUX.1-Kontext directory given (--kontext) and no single files for: {missing}")
        if transformer is None:
            transformer = comps.transformer
        vae = comps.vae if vae_file is None else sf.load_bfl_vae(vae_file, dtype=dtype, device=load_dev)
        if comps is not None:
            scheduler = comps.scheduler
        else:
            scheduler = default_scheduler()
        text = comps.text if comps is not None else None
        if clip_file is not None or (needs_t5 and t5_file is not None):
            text = _single_file_text(text, clip_file, t5_file if needs_t5 else None, tokenizer_dir, kontext_dir, dtype)
        loras = ()
        if lora_files:
            from gie_core.weights.lora import load_lora

            loras = tuple((load_lora(transformer, path), float(strength)) for path, strength in lora_files)
        return cls(
            transformer=transformer, vae=vae, scheduler=scheduler, text=text, qwen=qwen, connector=connector,
            device=device, offload=offload, loras=loras,
        )

    # ------------------------------------------------------------------
    def conditioning(self, images: ImageLike, instruction: str, mode: str = DEFAULT_FUSION_MODE) -> Conditioning:
        """Encode and fuse (image, instruction) into Kontext conditioning for ``mode``."""
        check_instruction(instruction)
        spec = fusion_mode(mode)
        vlm = None
        if spec.needs_qwen:
            if self.qwen is None or self.connector is None:
                raise ValueError(f"fusion mode '{mode}' needs the Qwen-VL encoder and connector (load a GPT-Image-Edit checkpoint)")
            queries = self.connector.queries if spec.queries else None
            with self.on_device(self.qwen.model):
                vlm = self.qwen.encode(images, instruction, queries=queries)
        if self.text is None:
            raise ValueError("no CLIP/T5 text encoders are loaded")
        with self.on_device(self.text.clip, self.text.t5):
            text = self.text.encode(instruction, with_t5=spec.needs_t5)
        with self.on_device(self.connector):
            cond = fuse(mode, self.connector, vlm, text)  # fuse moves features to the connector's device
        return cond.to("cpu")

    def encode(
        self,
        image: ImageLike,
        instruction: str,
        *,
        request: EditRequest | None = None,
        negative_instruction: str | None = None,
        **options,
    ) -> EncodedEdit:
        """Check, pad (when snapping) and encode ``image`` + ``instruction`` once: the conditioning
        (and the negative one with true CFG) and the prepared reference, ready for
        :meth:`render` with any seed. ``request`` or ``options`` as for :meth:`edit`."""
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
        return EncodedEdit(request, positive, negative, latents, record)

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
        from gie_core.weights.lora import activated

        request = encoded.request
        if seed is not None and seed != request.seed:
            request = dataclasses.replace(request, seed=check_int("seed", seed, *SEED_RANGE))
        # only take charge of the adapters when this pipeline was given LoRAs
        loras = activated(self.transformer, self.loras) if self.loras else contextlib.nullcontext()
        with self.on_device(self.transformer, self.vae), loras:
            out = sample(
                KontextModels(self.transformer, self.vae, self.scheduler), encoded.positive, None, request,
                reference_latents=[encoded.reference_latents], negative=encoded.negative, device=self.device,
                progress=progress, interrupt=interrupt,
            ).cpu()
        if encoded.pad_record is not None:
            out = crop_padding(out, encoded.pad_record)
        info = {"width": request.width, "height": request.height, "mode": request.mode, "request": request}
        return EditResult(to_pil(out), out, encoded.pad_record, encoded.positive, info)

    def edit(
        self,
        image: ImageLike,
        instruction: str,
        *,
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
        """
        encoded = self.encode(image, instruction, request=request, negative_instruction=negative_instruction, **options)
        return self.render(encoded, progress=progress, interrupt=interrupt)


# What the image itself decides, so EditPipeline.edit's options cannot set it.
_FROM_THE_IMAGE = ("image_width", "image_height", "n_images")


def _resolve_options(checked: torch.Tensor, n_images: int, options: dict) -> EditRequest:
    """The :class:`EditRequest` of :meth:`EditPipeline.edit`'s keyword options: ``resolve_edit``'s
    keywords (``size`` = (width, height) as a shorthand), the image's size and batch added."""
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
    return resolve_edit(image_width=checked.shape[2], image_height=checked.shape[1], n_images=n_images, **options)


def _single_file_text(text, clip_file, t5_file, tokenizer_dir, kontext_dir, dtype) -> TextEncoders:
    """CLIP / T5 from single files, with tokenizers from ``tokenizer_dir`` (or the Kontext dir);
    a part without a file comes from the Kontext directory's ``text``."""
    from pathlib import Path

    tok_root = tokenizer_dir or kontext_dir
    if tok_root is None:
        raise ValueError(
            "single-file text encoders need their tokenizers: pass --tokenizers DIR "
            "(a FLUX.1 diffusers folder, or any folder with tokenizer/ (CLIP) and tokenizer_2/ (T5))"
        )
    tok_root = Path(tok_root)
    if clip_file is None:  # only T5 from a file: CLIP comes from the directory
        t5_only = load_text_encoder_files(None, t5_file, None, tok_root / "tokenizer_2", dtype=dtype)
        return TextEncoders(text.clip, text.clip_tokenizer, t5_only.t5, t5_only.t5_tokenizer)
    loaded = load_text_encoder_files(clip_file, t5_file, tok_root / "tokenizer", tok_root / "tokenizer_2", dtype=dtype)
    if t5_file is None and text is not None and text.t5 is not None:
        loaded.t5, loaded.t5_tokenizer = text.t5, text.t5_tokenizer
    return loaded
