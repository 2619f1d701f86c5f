"""The LoRA loader: a Step1X-Edit LoRA from models/loras on a clone of the DiT's model patcher."""

from __future__ import annotations

import os
from dataclasses import replace

from ..step1x.checkpoints.lora import load_lora
from . import _comfy as bridge
from .sockets import CATEGORY, DIT


class LoraLoader:
    DESCRIPTION = ("Applies a Step1X-Edit LoRA from models/loras to the DiT at a strength. The output is a new model "
                   "and the input model stays as it was, so one DiT loader can feed samplers with and without the "
                   "LoRA; chain loaders to combine LoRAs. The weights are patched when the model is loaded (fp8 and "
                   "--lowvram included). Reads kohya files (lora_unet_*, as the official trainer writes them), "
                   "ComfyUI/PEFT (diffusion_model.*, transformer.*), DiffSynth-Studio and diffusers layouts.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The DiT with the LoRA. Connect it to the Sampler; the Connector may take this model or the "
                       "one before the LoRA.",)

    def __init__(self):
        self.loaded = None
        """(file, its size and time, the DiT's architecture) and the LoRA read for them, as LoraLoader caches."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT, {"tooltip": "The Step1X-Edit DiT (from the DiT loader or another LoRA loader)."}),
            "lora_name": (bridge.model_files("loras"), {
                "tooltip": "A Step1X-Edit LoRA (.safetensors) in models/loras."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": (
                "How strongly the LoRA changes the model: 1.0 as trained, 0 leaves the model unchanged, negative "
                "values push the other way.")}),
        }}

    def load(self, model, lora_name, strength):
        path = bridge.model_path("loras", lora_name)
        stat = os.stat(path)
        key = (str(path), stat.st_size, stat.st_mtime_ns, model.model.params)
        if self.loaded is None or self.loaded[0] != key:
            self.loaded = (key, load_lora(path, model.model))
        if strength == 0:
            return (model,)
        patcher = bridge.add_lora(model.patcher, self.loaded[1], strength)
        return (replace(model, patcher=patcher, name=f"{model.name} + {lora_name}"),)
