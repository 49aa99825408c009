"""Conversations, as the reference app keeps them: turns that flow from node to node, answers, routing.

A ``GIE_CONVERSATION`` output carries an immutable :class:`gie_core.engine.conversation.Conversation`;
each turn node gives a new one. An edit turn's conversation waits for its image: connect the
sampler's output to the next turn's ``previous_result`` (it joins as the assistant's reply, so
later turns are conditioned on it, as the app does).
"""

from __future__ import annotations

import torch

from gie_core.constants import (
    ANSWER_MAX_NEW_TOKENS,
    ANSWER_MAX_NEW_TOKENS_RANGE,
    DEFAULT_REFERENCE_METHOD,
    DEFAULT_ROUTE,
    MAX_IMAGES_PER_TURN,
    REFERENCE_RESIZE_MODES,
    ROUTE_MODES,
    TASK_HEAD_TOKEN,
)
from gie_core.engine.connector import QwenFeatures, fuse
from gie_core.engine.conversation import Conversation
from gie_core.engine.encoders import check_instruction
from gie_core.engine.modes import DEFAULT_FUSION_MODE, FUSION_MODES, fusion_mode, tooltip as modes_tooltip
from gie_core.engine.request import resolve_edit
from gie_core.engine.sampler import encode_reference, latents_out
from gie_core.engine.taskhead import assistant_hidden, route as route_turn
from gie_core.imaging.images import prepare_reference
from gie_core.weights.parts import load_part

from . import comfy
from .common import (
    ANY_TEXT_ENCODERS,
    ANY_VAE,
    CAT_CONDITIONING,
    CAT_LOADERS,
    CONNECTOR,
    CONVERSATION,
    QWEN_VL,
    TASK_HEAD,
    TURN_REFERENCES,
    TURN_SIZE,
    check_image,
    require,
    ui_text,
    vae_input,
)
from .encode import instruction_input, text_features

QWEN_HINT = "the GPT-Image-Edit Checkpoint Loader's or GIE Qwen-VL Loader's qwen_vl output"


def conversation_inputs() -> dict:
    """The optional inputs every turn node shares: the conversation so far, the previous edit's
    image, and the turn's up to two images."""
    return {
        "conversation": (CONVERSATION, {"tooltip": "The conversation so far (a previous turn's conversation output); "
                                        "unconnected: a new conversation."}),
        "previous_result": ("IMAGE", {"tooltip": "The image the previous edit turn made (its sampler's output): it joins "
                                      "the conversation as the assistant's reply, so this turn sees it."}),
        "image": ("IMAGE", {"tooltip": "Image 1 of this turn (optional after the first turn: the conversation's images "
                            "stay)."}),
        "image_2": ("IMAGE", {"tooltip": f"Image 2 (the app's reference image), e.g. 'put the jacket from image 2 on the "
                              f"person in image 1'. At most {MAX_IMAGES_PER_TURN} images a turn."}),
    }


def continue_conversation(conversation, previous_result) -> Conversation:
    """The conversation this turn continues: a new one, or ``conversation`` with the previous edit's
    image as the reply its waiting turn needs."""
    base = conversation if conversation is not None else Conversation()
    if not isinstance(base, Conversation):
        raise TypeError(f"conversation must come from a GIE turn node, not a {type(base).__name__}")
    if previous_result is not None:
        image = check_image(previous_result, "previous_result")
        if not base.pending:
            raise ValueError("previous_result is connected but the conversation has no edit waiting for its image; "
                             "connect only the image of the turn that made the conversation")
        return base.add_assistant_image(image[:1])
    if base.pending:
        raise ValueError("the conversation's last turn is an edit without its image: connect that turn's edited image "
                         "(its sampler's output) to previous_result")
    return base


def turn_images(image, image_2) -> list[torch.Tensor]:
    """The turn's images, each one ComfyUI IMAGE of batch 1 (Image 2 needs Image 1)."""
    if image_2 is not None and image is None:
        raise ValueError("image_2 is connected but image is not; connect Image 1 first")
    out = []
    for name, img in (("image", image), ("image_2", image_2)):
        if img is not None:
            checked = check_image(img, name)
            if checked.shape[0] != 1:
                raise ValueError(f"{name} is a batch of {checked.shape[0]} images; a turn takes one image per input")
            out.append(checked)
    return out


def user_turn(conversation, previous_result, text: str, image, image_2) -> Conversation:
    """The conversation with this turn's text and images added (checked before any model runs)."""
    check_instruction(text)
    return continue_conversation(conversation, previous_result).add_user(text, turn_images(image, image_2))


def answer(qwen, conversation: Conversation, max_new_tokens: int) -> str:
    with qwen.use():
        return qwen.model.answer(conversation, int(max_new_tokens))


def max_new_tokens_input() -> tuple:
    return ("INT", {"default": ANSWER_MAX_NEW_TOKENS, "min": ANSWER_MAX_NEW_TOKENS_RANGE[0],
                    "max": ANSWER_MAX_NEW_TOKENS_RANGE[1],
                    "tooltip": f"Longest answer, in tokens (the app: {ANSWER_MAX_NEW_TOKENS}, greedy)."})


class GIEConversationTurn:
    DESCRIPTION = (
        "One turn of a GPT-Image-Edit conversation, as the reference app runs it: Qwen2.5-VL reads the whole "
        "conversation (every earlier turn, image and answer) with this instruction and up to two images; gives the "
        "Kontext conditioning with every image of the conversation as a reference latent (for GIE Kontext Sampler "
        "with no image, or native KSampler), the app's output size, and the conversation extended. route: edit, "
        "answer, or auto (the task head decides)."
    )
    CATEGORY = CAT_CONDITIONING
    FUNCTION = "turn"
    RETURN_TYPES = ("CONDITIONING", CONVERSATION, "INT", "INT", "STRING")
    RETURN_NAMES = ("conditioning", "conversation", "width", "height", "answer")
    OUTPUT_TOOLTIPS = (
        "Kontext conditioning with every image of the conversation in reference_latents (what one native "
        "ReferenceLatent per image gives). Not produced when the turn is answered.",
        "The conversation with this turn; an edit waits for its image (connect the sampler's output to the next "
        "turn's previous_result).",
        "Output width by the app's rule (this turn's image, or the mean of two at ~1 MP), for the sampler or "
        "EmptySD3LatentImage.",
        "Output height, likewise.",
        "The answer, when the turn is routed to answering (not produced otherwise).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "qwen_vl": (QWEN_VL, {"tooltip": "The Qwen2.5-VL (with its lm_head when turns may be answered)."}),
                "connector": (CONNECTOR, {"tooltip": "The fusion connector from the GPT-Image-Edit loaders."}),
                "text_encoders": (ANY_TEXT_ENCODERS, {"tooltip": "CLIP-L and T5-XXL (ours or native DualCLIPLoader): "
                                                      "the current instruction's T5 tokens and CLIP pooled vector."}),
                "vae": (ANY_VAE, {"tooltip": "The FLUX VAE: encodes every image of the conversation as a reference."}),
                "instruction": instruction_input("This turn's instruction (or question, when it is answered)."),
                "mode": ([m for m in FUSION_MODES if fusion_mode(m).needs_qwen],
                         {"default": DEFAULT_FUSION_MODE, "tooltip": modes_tooltip()}),
                "route": (list(ROUTE_MODES), {"default": DEFAULT_ROUTE, "tooltip": (
                    "edit: make an image; answer: reply in text; auto: the task head decides (edit when no task "
                    "head is connected). An answered turn blocks the conditioning, so the sampler is skipped.")}),
                "reference_resize": (list(REFERENCE_RESIZE_MODES), {"default": "preferred", "tooltip": (
                    "How each image becomes a reference: preferred (nearest Kontext training resolution) or keep "
                    "(its own size, floored to a multiple of 16). Each image keeps its own size; none are stacked.")}),
            },
            "optional": {
                **conversation_inputs(),
                "task_head": (TASK_HEAD, {"tooltip": "The generate-or-answer head (GIE Task Head Loader), for route auto."}),
                "max_new_tokens": max_new_tokens_input(),
            },
        }

    def turn(self, qwen_vl, connector, text_encoders, vae, instruction, mode, route, reference_resize,
             conversation=None, previous_result=None, image=None, image_2=None, task_head=None,
             max_new_tokens=ANSWER_MAX_NEW_TOKENS):
        qwen = require(qwen_vl, "qwen_vl", QWEN_HINT)
        conn = require(connector, "connector", "the GPT-Image-Edit loaders' connector output")
        conv = user_turn(conversation, previous_result, instruction, image, image_2)
        if route == "edit":
            conv.check_edit_fits()  # before any model runs (auto learns its route from the encoding)
        spec = fusion_mode(mode)
        queries = conn.model.queries if spec.queries else None
        with qwen.use():
            feats = qwen.model.encode_conversation(conv, queries=queries)
            hidden = None
            if route == "auto" and task_head is not None:
                position = qwen.model.role_token_position(feats.input_ids, TASK_HEAD_TOKEN)
                hidden = assistant_hidden(feats, position).float().cpu()
        decision = route_turn(route, task_head, hidden)
        if decision.decision == "answer":
            text = answer(qwen, conv, max_new_tokens)
            done = comfy.blocked()
            return ui_text(f"{decision.note}\n{text}", (done, conv.add_assistant_text(text), done, done, text))
        conv.check_edit_fits()
        width, height, references = self.references(conv, vae, reference_resize)
        qwen_feats = QwenFeatures(feats.hidden.cpu(), feats.num_queries)
        with conn.use():
            cond = fuse(mode, conn.model, qwen_feats, text_features(text_encoders, instruction)).to("cpu")
        cond.extra.update({TURN_REFERENCES: len(references), TURN_SIZE: (width, height)})
        if references:  # none: text to image (no image in the whole conversation), as in the app
            # placed as the library places a conversation's images (native Flux reads the method too)
            cond.extra.update(reference_latents=references, reference_latents_method=DEFAULT_REFERENCE_METHOD)
        return ui_text(decision.note, (cond.to_comfy(), conv, width, height, comfy.blocked()))

    @staticmethod
    def references(conv: Conversation, vae, reference_resize: str):
        """The app's output size, and raw VAE latents [1, 16, h, w] (as native VAEEncode gives) of
        every image of the conversation, each at its own reference size."""
        sizes = conv.sizing_sizes()  # the app's 1024x1024 when no turn had an image (text to image)
        request = resolve_edit(image_width=sizes[0][0], image_height=sizes[0][1], more_images=sizes[1:],
                               reference_resize=reference_resize)
        codec, vae_ctx, _ = vae_input(require(vae, "vae", "a GIE VAE loader's vae or native Load VAE"))
        latents = []
        with vae_ctx as device:
            for im in conv.images():
                ref = prepare_reference(im, reference_resize)
                latents.append(latents_out(encode_reference(codec, ref, device or "cpu").float()).cpu())
        return request.width, request.height, latents


class GIEAnswer:
    DESCRIPTION = (
        "Answers a question about the images (\"what colour is the car?\", \"read the sign\") with the checkpoint's "
        "Qwen2.5-VL, as the reference app does (greedy, 128 new tokens): text, and the conversation with the answer."
    )
    CATEGORY = CAT_CONDITIONING
    FUNCTION = "answer"
    RETURN_TYPES = ("STRING", CONVERSATION)
    RETURN_NAMES = ("answer", "conversation")
    OUTPUT_TOOLTIPS = ("The answer.", "The conversation with this question and its answer.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "qwen_vl": (QWEN_VL, {"tooltip": "The Qwen2.5-VL with its lm_head (the checkpoint loader's; GIE "
                                      "Qwen-VL Loader with lm_head 'if present' or 'required')."}),
                "question": ("STRING", {"default": "What colour is the car?", "multiline": True,
                                        "tooltip": "The question about the images (or the conversation)."}),
                "max_new_tokens": max_new_tokens_input(),
            },
            "optional": conversation_inputs(),
        }

    def answer(self, qwen_vl, question, max_new_tokens, conversation=None, previous_result=None, image=None,
               image_2=None):
        qwen = require(qwen_vl, "qwen_vl", QWEN_HINT)
        conv = user_turn(conversation, previous_result, question, image, image_2)
        text = answer(qwen, conv, max_new_tokens)
        return ui_text(text, (text, conv.add_assistant_text(text)))


class GIETaskHeadLoader:
    DESCRIPTION = (
        "Loads the generate-or-answer task head of a GPT-Image-Edit checkpoint folder (task_head.safetensors, or "
        "the shipped task_head_final.pt read with torch.load(weights_only=True)), for Conversation Turn's route auto."
    )
    CATEGORY = CAT_LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (TASK_HEAD,)
    RETURN_NAMES = ("task_head",)
    OUTPUT_TOOLTIPS = ("The task head (float32, on the CPU: two small layers).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"checkpoint": (comfy.list_model_dirs(comfy.GIE_FOLDER), {
            "tooltip": "A GPT-Image-Edit checkpoint folder under models/gpt_image_edit holding the task head."})}}

    def load(self, checkpoint):
        folder = comfy.resolve_model_dir(comfy.GIE_FOLDER, checkpoint)
        return (load_part("task_head", folder).module,)


NODES = {
    "GIEConversationTurn": (GIEConversationTurn, "Conversation Turn"),
    "GIEAnswer": (GIEAnswer, "Answer"),
    "GIETaskHeadLoader": (GIETaskHeadLoader, "Task Head Loader"),
}
