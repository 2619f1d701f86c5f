"""Instruction encoding (MLLM) and binding the embeddings to the DiT's connector."""

from __future__ import annotations

import logging

import torch
from PIL import Image

from ..step1x.geometry import resize_to_size_level, upscale_note
from ..step1x.graph_io import to_pil_list
from ..step1x.pipeline import T2I_CONDITIONING_SIZE, check_edit_image, check_instruction
from ..step1x.sampling.denoise import TextConditioning
from . import _comfy as bridge
from .sockets import CATEGORY, CONDITIONING, DIT, EMBEDS, MLLM, InstructionEmbeds, Step1XConditioning

log = logging.getLogger("step1x_edit")

MLLM_TOKENS = 1024
"""Tokens of one MLLM forward (about 324 image tokens plus the prompt), for the memory estimate."""


class InstructionEncode:
    DESCRIPTION = ("Encodes the edit instruction together with the reference image with the MLLM, for both sides of "
                   "classifier-free guidance (instruction and negative). The image is resized to size_level first, "
                   "as the official editor does. Without an image it encodes a text-to-image prompt (v1.1). "
                   "It does not depend on the seed, so changing only the seed does not re-run it.")
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
            },
        }

    def encode(self, mllm, instruction, negative_prompt, size_level, image=None):
        check_instruction(instruction)
        check_instruction(negative_prompt, "negative prompt")
        if not instruction.strip():
            log.warning("Step1X-Edit Instruction Encode: the instruction is empty, so nothing tells the model what to "
                        "%s (the official code allows this); type it into the node.",
                        "draw" if image is None else "change")
        if image is None:
            images, working = [Image.new("RGB", T2I_CONDITIONING_SIZE)], None
        else:
            pils = to_pil_list(image)
            check_edit_image(pils[0].width, pils[0].height, size_level)
            note = upscale_note(pils[0].width, pils[0].height, size_level)
            if note:
                log.warning("Step1X-Edit: %s Press Cancel to stop the run.", note)
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
