"""The RegionE node: lets the sampler compute only the edited region of an edit after a few full steps."""

from __future__ import annotations

from dataclasses import replace

from ..step1x.sampling.regione_rules import REGION_SOURCES, RegionEConfig, parse_refresh
from .sockets import CATEGORY, DIT

AUTO = "auto"


class RegionE:
    DESCRIPTION = ("Speeds edits up with RegionE (region-aware editing): after a few full steps the sampler finds the "
                   "tokens the edit changes, moves the others to a later step in one jump, and runs the DiT only on "
                   "the changed region (with the rest held in a key/value cache), reusing a velocity on steps where "
                   "it barely changes. About 2.5x less DiT work on typical edits; results differ slightly from a "
                   "full run. Needs a reference image; not with TeaCache.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same DiT, sampled with RegionE. Connect it to the Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT, {"tooltip": "The Step1X-Edit DiT (from the DiT loader or a LoRA loader)."}),
            "threshold": ("FLOAT", {"default": 0.88, "min": -1.0, "max": 1.0, "step": 0.01, "tooltip": (
                "A token counts as edited when its one-step estimate's cosine similarity to the reference is at "
                "most this (0.88, the reference setting). Higher: more tokens are computed; 1.0 computes all.")}),
            "cache_threshold": ("FLOAT", {"default": 0.02, "min": 0.0, "max": 1.0, "step": 0.005, "tooltip": (
                "How much predicted change may pile up before a velocity is computed again instead of reused "
                "(0.02, the reference setting; 0 never reuses).")}),
            "warmup_steps": ("INT", {"default": -1, "min": -1, "max": 200, "tooltip": (
                "Full steps before the region is found (-1: 6 at 28 steps, scaled for other step counts).")}),
            "post_steps": ("INT", {"default": -1, "min": -1, "max": 200, "tooltip": (
                "Full steps at the end (-1: 2 at 28 steps, scaled).")}),
            "refresh_steps": ("STRING", {"default": AUTO, "tooltip": (
                "Steps that run in full once more and bring the waiting tokens up to date: a comma list such as "
                "16 or 12,20, empty for none, or auto (16 at 28 steps, scaled).")}),
            "erosion_dilation": ("BOOLEAN", {"default": True, "tooltip": (
                "Clean the edited region: drop isolated tokens, fill small holes, grow it by two tokens.")}),
            "region": (list(REGION_SOURCES), {"default": REGION_SOURCES[0], "tooltip": (
                "similarity: RegionE finds the region itself. mask: the Sampler's mask is the region (needs a "
                "mask); with a mask and similarity, tokens outside the mask are never computed.")}),
        }}

    def apply(self, model, threshold, cache_threshold, warmup_steps, post_steps, refresh_steps, erosion_dilation,
              region):
        if model.teacache:
            raise ValueError("this model already has TeaCache; RegionE and TeaCache both skip DiT work per step and "
                             "cannot be combined: remove one of the two nodes")
        refresh = refresh_steps.strip().lower()
        config = RegionEConfig(
            threshold=float(threshold), cache_threshold=float(cache_threshold),
            warmup_steps=None if warmup_steps < 0 else int(warmup_steps),
            post_steps=None if post_steps < 0 else int(post_steps),
            refresh_steps=None if refresh == AUTO else parse_refresh(refresh),
            erosion_dilation=bool(erosion_dilation), region=region,
        )
        return (replace(model, regione=config),)
