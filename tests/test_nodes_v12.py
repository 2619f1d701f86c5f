"""The nodes with Step1X-Edit v1.2 and diffusers-layout model folders, through the headless bridge: what the
loaders list and learn, the v1.2 encoder layout and its checks, the Sampler's v1.2 path (equal to the library's
v1.2 edit), and the Think, Reflect and Reason Edit nodes (scripted replies, and real ones on the tiny encoder)."""

from __future__ import annotations

import importlib
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import seeded_image
from node_support import PACK_NAME, bind, lib, run_node, sample
from step1x.pipeline import EditOptions, Step1XPipeline
from step1x.pipeline_v12 import ModuleStages
from step1x.reasoning.scripted import EXAMPLE_SCRIPT, ScriptedGenerator
from step1x.sampling.regione_rules import RegionEConfig

V12 = "Step1X-Edit-v1p2"
V11 = "Step1X-Edit-v1p1-diffusers"
SIZE = 64
STEPS = 3


@pytest.fixture(scope="module")
def folders(bridge, tiny_v12_folder, tiny_v11_diffusers_folder, tmp_path_factory):
    """ComfyUI model folders holding: the v1.2 model folder and a lone transformer folder in diffusion_models,
    the v1.2 VAE as a diffusers vae folder in vae, and the v1.1-diffusers model folder in text_encoders."""
    root = tmp_path_factory.mktemp("comfy-models")
    links = {
        root / "diffusion_models" / V12: tiny_v12_folder,
        root / "diffusion_models" / "v12-transformer": tiny_v12_folder / "transformer",
        root / "vae" / "flux-vae-diffusers": tiny_v12_folder / "vae",
        root / "text_encoders" / V11: tiny_v11_diffusers_folder,
    }
    for name, target in links.items():
        name.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, name, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        for kind in ("diffusion_models", "vae", "text_encoders"):
            patch.setitem(bridge._HEADLESS_FOLDERS, kind, [*bridge._HEADLESS_FOLDERS.get(kind, []), root / kind])
        yield root


def choices(pack, node_id, name):
    return pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"][name][0]


@pytest.fixture(scope="module")
def v12_dit(pack, folders):
    return run_node(pack, "Step1XEditDiTLoader", unet_name=V12, weight_dtype="default", attention="auto")[0]


@pytest.fixture(scope="module")
def v12_vae(pack, folders):
    return run_node(pack, "Step1XEditVAELoader", vae_name=f"{V12}/vae")[0]


@pytest.fixture(scope="module")
def v12_mllm(pack, folders):
    return run_node(pack, "Step1XEditMLLMLoader", mllm_name=V12, dtype="fp32", device="default", lm_head=True)[0]


@pytest.fixture(scope="module")
def pipe(tiny_v12_folder):
    return Step1XPipeline.from_folder(tiny_v12_folder, device="cpu", compute_dtype=torch.float32, generation=True)


@pytest.fixture(scope="module")
def photo():
    return seeded_image(96, 64, seed=9)


def comfy(image: Image.Image) -> torch.Tensor:
    return lib("image_io").pil_to_comfy([image])


def encode(pack, mllm, photo=None, instruction='write "HI" on the wall', **kwargs):
    kwargs.setdefault("negative_prompt", "")
    if photo is not None:
        kwargs["image"] = comfy(photo)
    return run_node(pack, "Step1XEditInstructionEncode", mllm=mllm, instruction=instruction, size_level=SIZE,
                    **kwargs)[0]


# -------------------------------------------------------------------------------------------- the loaders


def test_the_dit_loader_lists_model_and_transformer_folders_not_their_shards(pack, folders, model_names):
    listed = choices(pack, "Step1XEditDiTLoader", "unet_name")
    assert {V12, "v12-transformer", model_names["dit"]} <= set(listed)
    assert not any(c.startswith((V12 + "/", "v12-transformer/")) for c in listed)


def test_the_vae_loader_lists_vae_folders_and_the_model_folders_vae(pack, folders, model_names):
    listed = choices(pack, "Step1XEditVAELoader", "vae_name")
    assert {f"{V12}/vae", "flux-vae-diffusers", model_names["vae"]} <= set(listed)
    assert not any(c.startswith("flux-vae-diffusers/") for c in listed)


def test_the_mllm_loader_lists_model_folders_wherever_they_are(pack, folders, model_names):
    listed = choices(pack, "Step1XEditMLLMLoader", "mllm_name")
    assert {V12, V11, model_names["mllm"]} <= set(listed)
    assert not any(c.startswith((V12 + "/", V11 + "/")) for c in listed)


def test_the_loaders_read_the_folder_and_the_mllm_learns_the_layout_from_the_dit_weights(pack, v12_dit, v12_vae,
                                                                                          v12_mllm, model_names):
    assert v12_dit.version == "v1.2" and v12_mllm.layout == "v1.2" and v12_mllm.encoder.can_generate
    v11 = run_node(pack, "Step1XEditMLLMLoader", mllm_name=V11, dtype="fp32", device="default")[0]
    plain = run_node(pack, "Step1XEditMLLMLoader", mllm_name=model_names["mllm"], dtype="fp32", device="default")[0]
    assert (v11.layout, plain.layout) == ("v1.0-v1.1", None)
    assert not v11.encoder.can_generate
    lone = run_node(pack, "Step1XEditDiTLoader", unet_name="v12-transformer", weight_dtype="default",
                    attention="auto")[0]
    assert lone.version == "v1.2"


def test_the_text_encoder_can_be_quantized_to_fp8(pack, folders):
    mllm = run_node(pack, "Step1XEditMLLMLoader", mllm_name=V12, dtype="bf16, quantized to fp8",
                    device="default")[0]
    fp8 = importlib.import_module(f"{PACK_NAME}.step1x.encoder.fp8").Fp8Linear
    assert any(isinstance(m, fp8) for m in mllm.encoder.model.modules())


# -------------------------------------------------------------------------------------- layout and sampler


def test_auto_follows_the_mllm_and_the_embeddings_are_per_prompt(pack, v12_mllm, photo):
    embeds = encode(pack, v12_mllm, photo)
    assert embeds.layout == "v1.2" and embeds.working_size == (64, 48) and embeds.rows == 1
    cond, uncond = embeds.cond[0], embeds.uncond[0]
    assert cond.txt_ids.shape[-1] == 3 and int(cond.text_mask.sum()) == 2 and int(uncond.text_mask.sum()) == 0
    assert cond.llm_embedding.shape[1] > uncond.llm_embedding.shape[1]


def test_the_connector_refuses_a_layout_its_dit_does_not_take(pack, v12_dit, v12_mllm, dit, photo):
    v11_embeds = encode(pack, v12_mllm, photo, layout="v1.0-v1.1")
    with pytest.raises(ValueError, match="set Instruction Encode's layout to v1.2"):
        bind(pack, v12_dit, v11_embeds)
    with pytest.raises(ValueError, match="set Instruction Encode's layout to v1.0-v1.1"):
        bind(pack, dit, encode(pack, v12_mllm, photo))


def test_the_sampler_refuses_a_dit_of_another_layout(pack, v12_dit, v12_mllm, dit, photo, v12_vae):
    conditioning = bind(pack, v12_dit, encode(pack, v12_mllm, photo))
    with pytest.raises(ValueError, match="takes the v1.0-v1.1 layout"):
        sample(pack, dit, conditioning, reference_image=comfy(photo), vae=v12_vae)


def library_latent(pipe, monkeypatch, run):
    """The model-space latent the library's v1.2 edit decodes."""
    seen = []
    decode = ModuleStages.decode
    monkeypatch.setattr(ModuleStages, "decode", lambda self, latent: seen.append(latent) or decode(self, latent))
    run()
    return seen[-1]


def test_the_v12_sampler_is_the_library_v12_edit(pack, v12_dit, v12_vae, v12_mllm, pipe, photo, monkeypatch):
    prompt = 'write "HI" on the wall'
    expected = library_latent(pipe, monkeypatch, lambda: pipe.edit(photo, prompt, EditOptions(
        steps=STEPS, size_level=SIZE, seed=5)))
    conditioning = bind(pack, v12_dit, encode(pack, v12_mllm, photo, prompt))
    latent = sample(pack, v12_dit, conditioning, seed=5, reference_image=comfy(photo), vae=v12_vae)["samples"]
    torch.testing.assert_close(lib("graph_io").latent_to_model_space(latent), expected, rtol=0, atol=1e-5)


def with_regione(pack, dit):
    return run_node(pack, "Step1XEditRegionE", model=dit, threshold=0.88, cache_threshold=0.02, warmup_steps=-1,
                    post_steps=-1, refresh_steps="auto", erosion_dilation=True, region="similarity")[0]


def test_a_regione_dit_samples_v12_as_the_library_with_regione(pack, v12_dit, v12_vae, v12_mllm, pipe, photo,
                                                              monkeypatch):
    prompt, steps = 'write "HI" on the wall', 10
    options = EditOptions(steps=steps, size_level=SIZE, seed=5)
    expected = library_latent(pipe, monkeypatch, lambda: pipe.edit(photo, prompt, replace(
        options, regione=RegionEConfig())))
    conditioning = bind(pack, v12_dit, encode(pack, v12_mllm, photo, prompt))
    fast = sample(pack, with_regione(pack, v12_dit), conditioning, seed=5, steps=steps, reference_image=comfy(photo),
                  vae=v12_vae)["samples"]
    torch.testing.assert_close(lib("graph_io").latent_to_model_space(fast), expected, rtol=0, atol=1e-5)
    full = sample(pack, v12_dit, conditioning, seed=5, steps=steps, reference_image=comfy(photo), vae=v12_vae)
    assert not torch.allclose(full["samples"], fast, atol=1e-3)


class MeanOnlyVAE:
    """ComfyUI's VAE interface without the pack's posterior sampling (as ComfyUI's own VAE)."""

    latent_channels, downscale_ratio = 16, 8

    def __init__(self, vae):
        self.vae = vae

    def encode(self, pixels):
        return self.vae.encode(pixels)

    def decode(self, samples):
        return self.vae.decode(samples)


def test_comfyuis_vae_gives_the_mean_and_the_same_noise(pack, v12_dit, v12_vae, v12_mllm, pipe, photo, monkeypatch):
    prompt = "make it blue"
    expected = library_latent(pipe, monkeypatch, lambda: pipe.edit(photo, prompt, EditOptions(
        steps=STEPS, size_level=SIZE, seed=5, sample_vae=False)))
    conditioning = bind(pack, v12_dit, encode(pack, v12_mllm, photo, prompt))
    latent = sample(pack, v12_dit, conditioning, seed=5, reference_image=comfy(photo),
                    vae=MeanOnlyVAE(v12_vae))["samples"]
    torch.testing.assert_close(lib("graph_io").latent_to_model_space(latent), expected, rtol=0, atol=1e-4)


def test_the_first_row_of_a_batch_is_the_single_result(pack, v12_dit, v12_vae, v12_mllm, photo):
    conditioning = bind(pack, v12_dit, encode(pack, v12_mllm, photo))
    one = sample(pack, v12_dit, conditioning, seed=2, reference_image=comfy(photo), vae=v12_vae)["samples"]
    two = sample(pack, v12_dit, conditioning, seed=2, reference_image=comfy(photo), vae=v12_vae,
                 batch_size=2)["samples"]
    assert two.shape[0] == 2
    torch.testing.assert_close(two[:1], one, rtol=0, atol=0)
    assert not torch.equal(two[1], two[0])


def test_v12_text_to_image_through_the_nodes_is_the_librarys(pack, v12_dit, v12_mllm, pipe, monkeypatch):
    negative = lib("encoder.template").T2I_NEGATIVE_PROMPT_V12
    expected = library_latent(pipe, monkeypatch, lambda: pipe.text_to_image(
        "a lighthouse", 64, 48, EditOptions(steps=STEPS, size_level=SIZE, seed=4)))
    embeds = encode(pack, v12_mllm, None, "a lighthouse", negative_prompt=negative)
    assert embeds.text_to_image
    latent = sample(pack, v12_dit, bind(pack, v12_dit, embeds), seed=4,
                    init_latent={"samples": torch.zeros(1, 16, 6, 8)})["samples"]
    torch.testing.assert_close(lib("graph_io").latent_to_model_space(latent), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- reasoning nodes


@pytest.fixture()
def scripted(monkeypatch):
    def install(script=EXAMPLE_SCRIPT):
        generator = ScriptedGenerator(script)
        module = importlib.import_module(f"{PACK_NAME}.nodes.reasoning")
        monkeypatch.setattr(module, "qwen_generate", lambda *args, **kwargs: generator)
        return generator
    return install


def test_think_writes_a_real_reply_on_the_tiny_encoder(pack, v12_mllm, photo):
    instruction, reasoning = run_node(pack, "Step1XEditThink", mllm=v12_mllm, image=comfy(photo),
                                      instruction="make the sky purple", seed=3, max_new_tokens=2)
    assert isinstance(instruction, str) and isinstance(reasoning, str) and reasoning


def test_think_uses_the_rewrite(pack, v12_mllm, photo, scripted):
    scripted()
    instruction, reasoning = run_node(pack, "Step1XEditThink", mllm=v12_mllm, image=comfy(photo),
                                      instruction="make the sky purple", seed=3)
    assert instruction == EXAMPLE_SCRIPT["think_reformat"][0] and instruction in reasoning


def test_reflect_gives_verdict_score_success_and_refine_prompt(pack, v12_mllm, photo, scripted):
    scripted()
    verdict, score, success, refine = run_node(pack, "Step1XEditReflect", mllm=v12_mllm, reference=comfy(photo),
                                               edited=comfy(photo), instruction="make the sky purple", seed=0)
    assert verdict.startswith("<#Think> Only part") and score == 48.0 and success is False
    assert refine == " Make the rest of the sky purple."


def test_a_reflection_that_never_closes_its_tags_ends_as_the_fixed_failure(pack, v12_mllm, photo, scripted):
    generator = scripted({**EXAMPLE_SCRIPT, "reflection": ["<#Think> I cannot decide"]})
    verdict, score, success, refine = run_node(pack, "Step1XEditReflect", mllm=v12_mllm, reference=comfy(photo),
                                               edited=comfy(photo), instruction="x", seed=0, retries=3)
    assert verdict == lib("reasoning.prompts").FAILED_REFLECTION and not success and refine == ""
    assert generator.counts["reflection"] == 3


def test_thinking_nodes_refuse_an_encoder_without_its_lm_head(pack, folders, photo):
    mllm = run_node(pack, "Step1XEditMLLMLoader", mllm_name=V12, dtype="fp32", device="default")[0]
    with pytest.raises(ValueError, match="turn lm_head on"):
        run_node(pack, "Step1XEditThink", mllm=mllm, image=comfy(photo), instruction="x", seed=0)


def test_thinking_nodes_refuse_the_text_encoder_of_a_v11_folder(pack, folders, photo):
    mllm = run_node(pack, "Step1XEditMLLMLoader", mllm_name=V11, dtype="fp32", device="default", lm_head=True)[0]
    with pytest.raises(ValueError, match="v1.0-v1.1 model folder"):
        run_node(pack, "Step1XEditReflect", mllm=mllm, reference=comfy(photo), edited=comfy(photo),
                 instruction="x", seed=0)


def reason(pack, dit, mllm, vae, photo, **kwargs):
    kwargs = {"think": True, "reflect": True, "max_tries": 3, "seed": 5, "steps": STEPS, "cfg": 6.0,
              "size_level": SIZE, **kwargs}
    return run_node(pack, "Step1XEditReasonEdit", model=dit, mllm=mllm, vae=vae, image=comfy(photo),
                    instruction="make the sky purple", **kwargs)


def test_reason_edit_runs_the_loop_as_the_library(pack, v12_dit, v12_mllm, v12_vae, pipe, photo, scripted):
    scripted()
    best, tries, reasoning = reason(pack, v12_dit, v12_mllm, v12_vae, photo)
    assert tries.shape == (2, 64, 96, 3) and best.shape == (1, 64, 96, 3)
    torch.testing.assert_close(best[0], tries[1], rtol=0, atol=0)
    assert "Best: try 2 of 2." in reasoning
    expected = pipe.reason_edit(photo, "make the sky purple", EditOptions(steps=STEPS, size_level=SIZE, seed=5),
                                generate=ScriptedGenerator(EXAMPLE_SCRIPT))
    for got, want in zip(tries, expected.images, strict=True):
        np.testing.assert_array_equal((got.numpy() * 255).round().astype(np.uint8), np.asarray(want))


def test_reason_edit_without_thinking_or_reflection_is_one_edit(pack, v12_dit, v12_mllm, v12_vae, photo):
    best, tries, reasoning = reason(pack, v12_dit, v12_mllm, v12_vae, photo, think=False, reflect=False)
    assert tries.shape[0] == 1 and "Try 1" in reasoning


def test_reason_edit_with_a_regione_dit_edits_as_the_library_with_regione(pack, v12_dit, v12_mllm, v12_vae, pipe,
                                                                         photo):
    best, _, _ = reason(pack, with_regione(pack, v12_dit), v12_mllm, v12_vae, photo, think=False, reflect=False,
                        steps=10)
    expected = pipe.edit(photo, "make the sky purple", EditOptions(steps=10, size_level=SIZE, seed=5,
                                                                   regione=RegionEConfig()))
    np.testing.assert_array_equal((best[0].numpy() * 255).round().astype(np.uint8), np.asarray(expected))


def test_the_native_model_loader_lists_what_the_dit_loader_lists(pack, folders):
    """v1.2 runs on the native path too (tested in test_native_comfyui.py): its loader offers the model folders."""
    listed = choices(pack, "Step1XEditModelLoader", "unet_name")
    assert V12 in listed and listed == choices(pack, "Step1XEditDiTLoader", "unet_name")


def test_reason_edit_refuses_a_bad_seed_and_a_quoted_placeholder_before_loading(pack, v12_dit, v12_mllm, v12_vae,
                                                                                photo, monkeypatch):
    monkeypatch.setattr(importlib.import_module(f"{PACK_NAME}.nodes.reasoning"), "reasoning_edit",
                        lambda *args, **kwargs: pytest.fail("the edit ran"))
    with pytest.raises(ValueError, match="the seed must be a whole number"):
        reason(pack, v12_dit, v12_mllm, v12_vae, photo, seed=-1)
    with pytest.raises(ValueError, match="even in quotes"):
        run_node(pack, "Step1XEditReasonEdit", model=v12_dit, mllm=v12_mllm, vae=v12_vae, image=comfy(photo),
                 instruction='write "<|image_pad|>"', think=True, reflect=True, max_tries=3, seed=5, steps=STEPS,
                 cfg=6.0, size_level=SIZE)


def test_reason_edit_refuses_a_v11_dit_and_zero_tries(pack, dit, v12_dit, v12_mllm, v12_vae, photo):
    with pytest.raises(ValueError, match="runs Step1X-Edit v1.2"):
        reason(pack, dit, v12_mllm, v12_vae, photo)
    with pytest.raises(ValueError, match="max_tries must be at least 1"):
        reason(pack, v12_dit, v12_mllm, v12_vae, photo, max_tries=0)


def test_cancel_stops_reason_edit(pack, bridge, v12_dit, v12_mllm, v12_vae, photo, scripted):
    scripted()
    bridge.request_interrupt()
    try:
        with pytest.raises(bridge.Interrupted):
            reason(pack, v12_dit, v12_mllm, v12_vae, photo)
    finally:
        bridge.request_interrupt(False)
