"""Instruction encoding (MLLM) and binding the embeddings to the DiT's connector."""

from __future__ import annotations

import logging

import torch
from PIL import Image

from ..step1x.encoder.image_v12 import blank_reference
from ..step1x.geometry import resize_to_size_level, upscale_note
from ..step1x.graph_io import to_pil_list
from ..step1x.pipeline import T2I_CONDITIONING_SIZE, check_edit_image, check_instruction
from ..step1x.sampling.denoise import TextConditioning
from . import _comfy as bridge
from .sockets import (
    CATEGORY,
    CONDITIONING,
    DIT,
    EMBEDS,
    LAYOUT_V11,
    LAYOUT_V12,
    MLLM,
    InstructionEmbeds,
    Step1XConditioning,
    check_layout,
)

log = logging.getLogger("step1x_edit")

V12_TOKENS = 2560
"""Tokens of one v1.2 MLLM forward at most (up to 400 image tokens and a 2048-token prompt)."""
MLLM_TOKENS = 1024
"""Tokens of one MLLM forward (about 324 image tokens plus the prompt), for the memory estimate."""
LAYOUTS = ["auto", LAYOUT_V11, LAYOUT_V12]


class InstructionEncode:
    DESCRIPTION = ("Encodes the edit instruction together with the reference image with the MLLM, for both sides of "
                   "classifier-free guidance (instruction and negative). The image is resized to size_level first, "
                   "as the official editor does. Without an image it encodes a text-to-image prompt. The layout "
                   "must be the one the DiT takes (v1.0-v1.1 or v1.2); auto follows what the MLLM loader read from "
                   "the model folder. It does not depend on the seed, so changing only the seed does not re-run it.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (EMBEDS,)
    RETURN_NAMES = ("EMBEDDINGS",)
    OUTPUT_TOOLTIPS = ("MLLM embeddings and masks for the instruction and the negative prompt.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mllm": (MLLM, {"tooltip": "The instruction encoder from the Step1X-Edit MLLM loader."}),
                "instruction": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "What to change, e.g. 'make the sky purple'. For text-to-image: the description of the image.")}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "The negative side of guidance. Editing officially uses an empty string; text-to-image uses the "
                    "official negative prompt (see the text-to-image workflow).")}),
                "size_level": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 16, "tooltip": (
                    "Working resolution: the image is resized to about size_level x size_level pixels at its aspect "
                    "ratio (sides multiples of 16). 512 or 1024 as in the official editor. Connect the original "
                    "image here and to the sampler: the sampler edits at this same size.")}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The image to edit (original size). Leave empty for text-to-image."}),
                "layout": (LAYOUTS, {"default": "auto", "tooltip": (
                    "The prompt layout of the DiT this feeds: v1.0-v1.1 (official 640-token embeddings) or v1.2 "
                    "(the v1.2 template, text positions and quote mask; size_level 1024 as its reference). auto: "
                    "v1.2 when the MLLM was loaded from a model folder whose transformer is v1.2, else v1.0-v1.1. "
                    "The Connector refuses a layout its DiT does not take.")}),
            },
        }

    def encode(self, mllm, instruction, negative_prompt, size_level, image=None, layout="auto"):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
        if layout == "auto":
            layout = mllm.layout or LAYOUT_V11
        version = "v1.2" if layout == LAYOUT_V12 else "v1.1"
        check_instruction(instruction, version=version)
        check_instruction(negative_prompt, "negative prompt", version)
        if not instruction.strip():
            log.warning("Step1X-Edit Instruction Encode: the instruction is empty, so nothing tells the model what to "
                        "%s (the official code allows this); type it into the node.",
                        "draw" if image is None else "change")
        if layout == LAYOUT_V12:
            return (encode_v12(mllm, instruction, negative_prompt, size_level, image),)
        if image is None:
            images, working = [Image.new("RGB", T2I_CONDITIONING_SIZE)], None
        else:
            pils = to_pil_list(image)
            check_edit_image(pils[0].width, pils[0].height, size_level)
            _note_upscale(pils[0], size_level)
            images = [resize_to_size_level(p, size_level) for p in pils]
            working = images[0].size
        encoder = mllm.encoder
        bridge.load([mllm.patcher], memory_required=MLLM_TOKENS * encoder.hidden_size * 4 * 16, full=True)
        pairs = [encoder.encode_pair(img, instruction, negative_prompt) for img in images]
        out = bridge.intermediate_device()
        emb = torch.stack([p.embedding for p in pairs]).to(out)
        mask = torch.stack([p.mask for p in pairs]).to(out)
        cond = TextConditioning(emb[:, 0], mask[:, 0])
        uncond = TextConditioning(emb[:, 1], mask[:, 1])
        return (InstructionEmbeds(cond, uncond, working, mllm.name),)


def encode_v12(mllm, instruction: str, negative_prompt: str, size_level: int, image=None) -> InstructionEmbeds:
    """The v1.2 layout: one conditioning per image and side (each trimmed to its tokens); without an image the
    black ``size_level`` square v1.2 shows the encoder for text-to-image."""
    if image is None:
        images, working = [blank_reference(size_level)], None
    else:
        pils = to_pil_list(image)
        check_edit_image(pils[0].width, pils[0].height, size_level, "v1.2")
        _note_upscale(pils[0], size_level)
        images = [resize_to_size_level(p, size_level) for p in pils]
        working = images[0].size
    encoder = mllm.encoder
    bridge.load([mllm.patcher], memory_required=V12_TOKENS * encoder.hidden_size * 4 * 16, full=True)
    out = bridge.intermediate_device()
    cond, uncond = [], []
    for img in images:
        pair = encoder.encode_pair_v12(img, instruction, negative_prompt)
        cond.append(_to(pair[0], out))
        uncond.append(_to(pair[1], out))
    return InstructionEmbeds(cond, uncond, working, mllm.name, layout=LAYOUT_V12)


def _note_upscale(image: Image.Image, size_level: int) -> None:
    note = upscale_note(image.width, image.height, size_level)
    if note:
        log.warning("Step1X-Edit: %s Press Cancel to stop the run.", note)


def _to(side: TextConditioning, device) -> TextConditioning:
    return TextConditioning(*(None if t is None else t.to(device) for t in (
        side.llm_embedding, side.mask, side.txt_ids, side.text_embeds, side.text_mask)))


class Connector:
    DESCRIPTION = ("Binds the instruction embeddings to the connector inside the Step1X-Edit DiT checkpoint. The "
                   "connector depends on the timestep, so it is evaluated by the sampler at every step; this node "
                   "checks that encoder and connector fit together.")
    CATEGORY = CATEGORY
    FUNCTION = "bind"
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Conditioning for the Step1X-Edit sampler (embeddings + the DiT's connector).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT, {"tooltip": "The Step1X-Edit DiT whose connector turns embeddings into DiT text tokens."}),
            "embeddings": (EMBEDS, {"tooltip": "The output of Step1X-Edit Instruction Encode."}),
        }}

    def bind(self, model, embeddings):
        check_layout(embeddings, model)
        expected = model.model.params.connector.in_channels
        if embeddings.hidden_size != expected:
            raise ValueError(
                f"the embeddings are {embeddings.hidden_size} wide (from '{embeddings.source}') but the connector of "
                f"'{model.name}' expects {expected}: use the encoder this DiT was trained with "
                "(Qwen2.5-VL-7B-Instruct, 3584, for the released Step1X-Edit)"
            )
        if embeddings.text_to_image and model.version == "v1.0":
            log.warning("Step1X-Edit: text-to-image was released with v1.1; %s is v1.0 and was not trained for it",
                        model.name)
        return (Step1XConditioning(embeddings, model),)
