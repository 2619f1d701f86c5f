"""The TeaCache node: lets the sampler skip the DiT's blocks on steps whose input barely changed."""

from __future__ import annotations

from dataclasses import replace

from .sockets import CATEGORY, DIT


class TeaCache:
    DESCRIPTION = ("Speeds sampling up by skipping the DiT's transformer blocks on steps whose input changed little "
                   "since the last computed step, reusing that step's change instead (the official TeaCache, with "
                   "its Step1X-Edit rescale curve). The first and last steps always run. Results differ slightly "
                   "from a full run; 0 turns it off.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same DiT, sampled with TeaCache. Connect it to the Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT, {"tooltip": "The Step1X-Edit DiT (from the DiT loader or a LoRA loader)."}),
            "threshold": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 2.0, "step": 0.01, "tooltip": (
                "How much change may accumulate before the blocks run again: 0 is off, 0.2 the official default "
                "(about half the block evaluations at 28 steps), higher is faster and less faithful.")}),
        }}

    def apply(self, model, threshold):
        if threshold and model.regione is not None:
            raise ValueError("this model already has RegionE; TeaCache and RegionE both skip DiT work per step and "
                             "cannot be combined: remove one of the two nodes")
        return (replace(model, teacache=float(threshold)),)
