"""Step1X-Edit v1.2 thinking and reflection as nodes: Think, Reflect, and Reason Edit (the whole loop).

Each runs on the v1.2 text encoder from the MLLM loader with ``lm_head`` on; the replies are sampled as the
reference samples them (top_p 0.9, temperature 0.7, at most 128 new tokens) from a stream seeded with ``seed``.
Generation shows its tokens in the progress bar and stops between tokens on Cancel.
"""

from __future__ import annotations

from ..step1x.graph_io import to_pil_list
from ..step1x.image_io import pil_to_comfy
from ..step1x.pipeline import check_instruction
from ..step1x.pipeline_v12 import ReasoningOptions, V12Settings, check_generation, qwen_generate, reasoning_edit
from ..step1x.reasoning import Thinker
from ..step1x.sampling.denoise import check_seed
from ..step1x.sampling.v12 import V12Options
from . import _comfy as bridge
from .sockets import CATEGORY, DIT, LAYOUT_V12, MLLM
from .v12 import ComfyStages

SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF, "control_after_generate": True,
                "tooltip": "Seed of the model's sampling (the same seed gives the same replies)."})
MAX_NEW_TOKENS = ("INT", {"default": 128, "min": 1, "max": 4096, "tooltip": (
    "New tokens per reply at most. 128 is what the v1.2 reference generates (it names larger budgets but its "
    "client ignores them).")})
RETRIES = ("INT", {"default": 20, "min": 1, "max": 100, "tooltip": (
    "Attempts per reflection step before its fallback (20 in the reference): a reply that never closes its tags is "
    "asked again up to this many times, then the try counts as failed (or scores 0).")})
LM_HEAD_FIX = " (Step1X-Edit MLLM Loader: choose the v1.2 model folder and turn lm_head on)"


def _generate(mllm, seed: int, max_new_tokens: int, stages: ComfyStages | None = None):
    check_generation(mllm.encoder, LM_HEAD_FIX)
    seed = check_seed(seed)
    place = stages.load_encoder if stages is not None else ComfyStages(None, None, mllm).load_encoder
    return qwen_generate(mllm.encoder, place, ReasoningOptions(max_new_tokens=max_new_tokens), seed,
                         should_stop=bridge.should_stop, on_token=bridge.Counter(max_new_tokens))


def _one_image(image, what: str):
    images = to_pil_list(image)
    if len(images) != 1:
        raise ValueError(f"{what} takes one image, but the IMAGE holds a batch of {len(images)}; pick one image "
                         "(e.g. with ComfyUI's ImageFromBatch)")
    return images[0]


def _check_mllm(mllm) -> None:
    if mllm.layout is not None and mllm.layout != LAYOUT_V12:
        raise ValueError(
            f"'{mllm.name}' is the text encoder of a Step1X-Edit {mllm.layout} model folder; thinking and "
            "reflection are trained into the v1.2 text encoder: load the Step1X-Edit-v1p2 model folder in the MLLM "
            "loader with lm_head on"
        )


class Think:
    DESCRIPTION = ("Step1X-Edit v1.2 thinking: the v1.2 text encoder rewrites an editing instruction for the image "
                   "into a more explicit one (one reply, as the reference's thinking mode). A reply that is empty "
                   "or an error report keeps the original instruction. Needs the MLLM loaded with lm_head on.")
    CATEGORY = CATEGORY
    FUNCTION = "think"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("instruction", "reasoning")
    OUTPUT_TOOLTIPS = ("The rewritten instruction, for Instruction Encode.",
                       "What happened: the rewrite, or why the original instruction was kept.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mllm": (MLLM, {"tooltip": "The v1.2 text encoder from the MLLM loader, with lm_head on."}),
                "image": ("IMAGE", {"tooltip": "The image to edit (the model sees it at most 1024 pixels a side)."}),
                "instruction": ("STRING", {"multiline": True, "default": "", "tooltip": "The editing instruction."}),
                "seed": SEED,
            },
            "optional": {"max_new_tokens": MAX_NEW_TOKENS},
        }

    def think(self, mllm, image, instruction, seed, max_new_tokens=128):
        _check_mllm(mllm)
        source = _one_image(image, "Think")
        result = Thinker(_generate(mllm, seed, max_new_tokens), should_stop=bridge.should_stop).think(
            source, instruction)
        return (result.instruction, result.reasoning)


class Reflect:
    DESCRIPTION = ("Step1X-Edit v1.2 reflection: the v1.2 text encoder judges an edit (describe, check consistency, "
                   "reflect: three replies, each retried until usable) and scores it (two replies), as the reference "
                   "does. Gives the verdict, the score min(success, over-editing) x min(naturalness, artifacts) "
                   "(0-100), whether the edit succeeded, and the instruction for a refining edit. Needs the MLLM "
                   "loaded with lm_head on.")
    CATEGORY = CATEGORY
    FUNCTION = "reflect"
    RETURN_TYPES = ("STRING", "FLOAT", "BOOLEAN", "STRING")
    RETURN_NAMES = ("verdict", "score", "success", "refine_prompt")
    OUTPUT_TOOLTIPS = (
        "The model's reflection (from <#Think>, with its tag), or the fixed failure text when no usable reply came.",
        "min(score1) x min(score2), 0-100: what the reference compares to pick the best try.",
        "True when the reflection says <#Success> or <#Others> (the reference stops retrying).",
        "With <#Reflection>: the instruction for editing the edited image again (its leading space kept, as the "
        "reference passes it); else empty.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mllm": (MLLM, {"tooltip": "The v1.2 text encoder from the MLLM loader, with lm_head on."}),
                "reference": ("IMAGE", {"tooltip": "The original image."}),
                "edited": ("IMAGE", {"tooltip": "The edit of the original image to judge."}),
                "instruction": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "The instruction the edit followed (after Think, if used).")}),
                "seed": SEED,
            },
            "optional": {
                "max_new_tokens": MAX_NEW_TOKENS,
                "retries": RETRIES,
            },
        }

    def reflect(self, mllm, reference, edited, instruction, seed, max_new_tokens=128, retries=20):
        _check_mllm(mllm)
        generate = _generate(mllm, seed, max_new_tokens)
        thinker = Thinker(generate, retries=retries, should_stop=bridge.should_stop)
        result = thinker.reflect(_one_image(reference, "Reflect"), _one_image(edited, "Reflect"), instruction)
        return (result.reflection, float(result.score), bool(result.success), result.refine_prompt or "")


class ReasonEdit:
    DESCRIPTION = ("Step1X-Edit v1.2 with thinking and reflection, the whole loop of the reference: think (rewrite "
                   "the instruction), edit, reflect, and retry up to max_tries edits (a refining edit of the last "
                   "result, or a fresh edit of the original); the best try by the reflection scores is returned. "
                   "The DiT and the text encoder are loaded in turn, never forced to stay together. Cancel stops "
                   "between tokens and between denoising steps.")
    CATEGORY = CATEGORY
    FUNCTION = "edit"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("IMAGE", "tries", "reasoning")
    OUTPUT_TOOLTIPS = ("The chosen edit, at the input size.", "Every try's edit, in order, as a batch.",
                       "The rewritten instruction, each try's reflection and scores, and the pick.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DIT, {"tooltip": "The Step1X-Edit v1.2 DiT (DiT loader on the Step1X-Edit-v1p2 folder)."}),
                "mllm": (MLLM, {"tooltip": (
                    "The v1.2 text encoder from the MLLM loader (lm_head on when thinking or reflecting).")}),
                "vae": ("VAE", {"tooltip": (
                    "The FLUX VAE (the v1.2 folder's vae in the VAE loader). The pack's loader samples the reference "
                    "latent as the reference does; ComfyUI's Load VAE gives its mean.")}),
                "image": ("IMAGE", {"tooltip": "The image to edit (one image)."}),
                "instruction": ("STRING", {"multiline": True, "default": "", "tooltip": "The editing instruction."}),
                "think": ("BOOLEAN", {"default": True, "tooltip": "Rewrite the instruction first (one reply)."}),
                "reflect": ("BOOLEAN", {"default": True, "tooltip": (
                    "Judge each edit (five replies normally) and retry until it succeeds or max_tries edits were "
                    "made. Off: one edit.")}),
                "max_tries": ("INT", {"default": 3, "min": 1, "max": 10, "tooltip": (
                    "Edits at most, the first included (3 in the reference).")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFF_FFFF_FFFF_FFFF, "control_after_generate": True,
                                 "tooltip": ("Seed of the edits (one generator carried from try to try, as the "
                                             "reference) and of the model's replies.")}),
                "steps": ("INT", {"default": 28, "min": 1, "max": 200, "tooltip": "Denoising steps per edit (28)."}),
                "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Guidance scale of true CFG (6.0)."}),
                "size_level": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 16, "tooltip": (
                    "Working resolution, about size_level x size_level pixels (v1.2's default: 1024).")}),
            },
            "optional": {
                "renorm_threshold": ("FLOAT", {"default": 0.93, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                    "The v1.2 reference compares its 0-1000 timestep with this, so 0.93 renormalises the guidance at "
                    "every step; 1.0 as well.")}),
                "max_new_tokens": MAX_NEW_TOKENS,
                "retries": RETRIES,
            },
        }

    def edit(self, model, mllm, vae, image, instruction, think, reflect, max_tries, seed, steps, cfg, size_level,
             renorm_threshold=0.93, max_new_tokens=128, retries=20):
        from ..step1x.graph_io import check_settings

        check_settings(steps, cfg, renorm_threshold, 1.0)
        check_seed(seed)
        check_instruction(instruction, version="v1.2")
        if model.version != "v1.2":
            raise ValueError(f"Reason Edit runs Step1X-Edit v1.2, but '{model.name}' is {model.version}; load the "
                             "Step1X-Edit-v1p2 model folder in the DiT loader")
        _check_mllm(mllm)
        source = _one_image(image, "Reason Edit")
        reasoning = ReasoningOptions(think=think, reflect=reflect, max_tries=max_tries, max_new_tokens=max_new_tokens,
                                     retries=retries)
        reasoning.validate()
        stages = ComfyStages(model, vae, mllm)
        generate = _generate(mllm, seed, max_new_tokens, stages) if reasoning.uses_model else None
        settings = V12Settings(V12Options(steps=steps, cfg_scale=cfg, renorm_threshold=renorm_threshold,
                                          size_level=size_level, seed=seed))
        result = reasoning_edit(stages, source, instruction, settings, reasoning, dtype=model.compute_dtype,
                                generate=generate, should_stop=bridge.should_stop)
        tries = pil_to_comfy(result.images).to(bridge.intermediate_device())
        best = tries[result.best_index:result.best_index + 1].clone()
        return (best, tries, result.reasoning_text() or f"One edit with {instruction!r}.")
