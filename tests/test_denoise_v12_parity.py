"""A plain v1.2 edit reproduces the v1.2 reference pipeline run ``denoise_v12`` (10 steps, cfg 6, renorm
threshold 0.93, size_level 64, generator seed 4242, 72x72 image; fp32), from the encoded prompts on.

Exact: the schedule, every DiT time, the image positions, the VAE input, the noise (RNG order) and the
final uint8 images. Tolerances elsewhere: the DiT outputs reach |18| (the reference set multiplies
``proj_out`` by 4) and its time embedding differs from ours by 4e-6 on the machine that made it (see
``test_dit_v12_parity``), so DiT outputs and the guided velocity are compared at 1e-4 (measured 7.3e-5) and
latents at 5e-5 (measured 2.7e-5); the renorm norms, the reference latent and the decoded image at 1e-5.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import step1x.sampling.denoise as denoise_module
from step1x.checkpoints.loading import load_dit, load_vae
from step1x.geometry import size_level_dims
from step1x.sampling import v12
from step1x.sampling.denoise import TextConditioning, pack, unpack
from step1x.sampling.rules import V12, diffusers_schedule, official_schedule, timesteps_1000

ATOL = 1e-5
DIT_ATOL = 1e-4
LATENT_ATOL = 5e-5
STEPS = 10


@pytest.fixture(scope="module")
def ref(v12_dir):
    return load_file(v12_dir / "denoise_v12.safetensors")


def _conditioning(ref, side):
    get = lambda name: ref[f"prompt.{side}.{name}"]  # noqa: E731
    return TextConditioning(get("embedding"), get("mask"), get("txt_ids"), get("text_embeds"), get("text_masks"))


@pytest.fixture(scope="module")
def run(v12_models, ref):
    """The whole edit, recording every DiT call, renorm and guided velocity, and every step's latent."""
    dit = load_dit(v12_models, compute_dtype=torch.float32)
    vae = load_vae(v12_models)
    record = {"dit": [], "norms": [], "guided": [], "steps": []}
    transformer = dit.transformer

    def dit_call(img, img_ids, txt_ids, timesteps, txt, y, pe=None, cache=None):
        out = transformer(img, img_ids, txt_ids, timesteps, txt, y, pe, cache=cache)
        record["dit"].append({"img": img.clone(), "t": timesteps.clone(), "img_ids": img_ids.clone(), "out": out})
        return out

    guidance, divisor = denoise_module.guidance, denoise_module.renorm_divisor

    def guided(*args, **kwargs):
        record["guided"].append(guidance(*args, **kwargs))
        return record["guided"][-1]

    def renorm(norm, k=0.4):
        record["norms"].append((norm, divisor(norm, k)))
        return record["norms"][-1][1]

    dit.transformer = dit_call
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(denoise_module, "guidance", guided)
        patch.setattr(denoise_module, "renorm_divisor", renorm)
        image = v12.edit(dit, vae, Image.fromarray(ref["in.image_uint8"].numpy()), _conditioning(ref, "cond"),
                         _conditioning(ref, "uncond"), v12.V12Options(steps=STEPS, size_level=64, seed=4242),
                         dtype=torch.float32, callback=record["steps"].append)
    record["image"] = image
    record["vae"] = vae
    return record


def test_the_schedule_is_the_reference_schedule(ref):
    sigmas = diffusers_schedule(STEPS, 16)
    assert sigmas == ref["sched.sigmas"].tolist()
    assert torch.equal(timesteps_1000(sigmas), ref["sched.timesteps"])


def test_the_schedule_differs_from_the_official_one_by_float32_rounding_only():
    """1 ulp for the reference run (10 steps, 16 tokens); at most 4 ulp (< 5e-7) up to 100 steps."""
    def ulps(steps, tokens):
        v12_sigmas = np.array(diffusers_schedule(steps, tokens), dtype=np.float32).view(np.int32).astype(np.int64)
        official = np.array(official_schedule(steps, tokens), dtype=np.float32).view(np.int32).astype(np.int64)
        return int(np.abs(v12_sigmas - official).max())

    assert ulps(STEPS, 16) == 1
    assert max(ulps(steps, tokens) for steps in (1, 10, 28, 50, 100) for tokens in (16, 1024, 4096)) <= 4


def test_the_renorm_acts_at_every_step_with_the_default_threshold(ref):
    assert all(V12.renorm_active(s, 0.93) for s in ref["sched.sigmas"][:-1].tolist())
    assert [V12.with_official_renorm().renorm_active(s, 0.93) for s in ref["sched.sigmas"][:-1].tolist()] == \
        [True, True] + [False] * 8


def test_cond_and_uncond_are_separate_calls_with_their_own_text(run, ref):
    assert len(run["dit"]) == 2 * STEPS
    assert [call["img"].shape[0] for call in run["dit"]] == [1] * 2 * STEPS
    assert ref["prompt.cond.txt_ids"].shape[0] != ref["prompt.uncond.txt_ids"].shape[0]


def test_every_dit_input_matches_the_reference(run, ref):
    assert torch.equal(run["dit"][0]["img_ids"][0], ref["prepared.img_ids"])
    for n in range(STEPS):
        for call in run["dit"][2 * n: 2 * n + 2]:
            torch.testing.assert_close(call["img"], ref[f"step{n}.dit_in.hidden_states"], atol=LATENT_ATOL, rtol=0)
            assert torch.equal(call["t"], ref[f"step{n}.dit_in.timestep"])


def test_every_dit_output_matches_the_reference(run, ref):
    for n in range(STEPS):
        cond, uncond = run["dit"][2 * n]["out"], run["dit"][2 * n + 1]["out"]
        torch.testing.assert_close(cond, ref[f"step{n}.dit_out.cond"], atol=DIT_ATOL, rtol=0)
        torch.testing.assert_close(uncond, ref[f"step{n}.dit_out.uncond"], atol=DIT_ATOL, rtol=0)


def test_every_renorm_and_guided_velocity_matches_the_reference(run, ref):
    assert len(run["norms"]) == STEPS
    for n in range(STEPS):
        norm, processed = run["norms"][n]
        torch.testing.assert_close(norm, ref[f"step{n}.diff_norm"], atol=ATOL, rtol=0)
        torch.testing.assert_close(processed, ref[f"step{n}.diff_norm_processed"], atol=ATOL, rtol=0)
        torch.testing.assert_close(run["guided"][n], ref[f"step{n}.guided"], atol=DIT_ATOL, rtol=0)


def test_every_latent_and_the_final_latent_match_the_reference(run, ref):
    for n in range(STEPS):
        torch.testing.assert_close(pack(run["steps"][n].latent), ref[f"step{n}.latents_out"], atol=LATENT_ATOL,
                                   rtol=0)
    torch.testing.assert_close(pack(run["steps"][-1].latent), ref["out.latents_packed"], atol=LATENT_ATOL, rtol=0)


def test_the_decoded_image_and_both_uint8_images_match_the_reference(run, ref):
    decoded = v12.decode(run["vae"], run["steps"][-1].latent)
    torch.testing.assert_close(decoded, ref["out.decoded"], atol=ATOL, rtol=0)
    assert torch.equal(v12.to_uint8(decoded)[0], ref["out.image_postprocessed_uint8"])
    assert np.array_equal(np.asarray(run["image"]), ref["out.image_final_uint8"].numpy())


def test_the_output_rounds_and_resizes_back_like_the_reference(ref):
    pixels = v12.to_uint8(ref["out.decoded"])[0]
    assert torch.equal(pixels, ref["out.image_postprocessed_uint8"])
    truncated = (ref["out.decoded"] * 0.5 + 0.5).clamp(0, 1).mul(255).to(torch.uint8)[0].permute(1, 2, 0)
    assert not torch.equal(truncated, pixels)
    assert np.array_equal(np.asarray(v12.restore_size(pixels, (72, 72))), ref["out.image_final_uint8"].numpy())


def test_the_decoder_input_is_the_reference_one(ref):
    latent = unpack(ref["out.latents_packed"], 8, 8)
    torch.testing.assert_close(latent / 0.3611 + 0.1159, ref["out.vae_decode_in"], atol=0, rtol=0)


def test_the_vae_input_posterior_sample_and_noise_follow_the_reference_order(run, ref):
    image = Image.fromarray(ref["in.image_uint8"].numpy())
    pixels = v12.vae_input(image, (64, 64))
    assert torch.equal(pixels, ref["vae_in.image"])
    generator = torch.Generator().manual_seed(4242)
    with torch.no_grad():
        latent = v12.encode_reference(run["vae"], pixels, generator)
    torch.testing.assert_close(latent, ref["prepared.ref_latent"], atol=ATOL, rtol=0)
    assert torch.equal(v12.initial_noise((64, 64), generator, torch.float32), ref["prepared.noise"])


def test_the_size_rules_are_the_reference_ones(v12_dir):
    for case in json.loads((v12_dir / "sizes_v12.json").read_text()):
        width, height = case["in_wh"]
        work = size_level_dims(width, height, case["size_level"])
        assert list(work) == case["gen_wh"] == case["qwen_ref_image_wh"]
        assert v12.working_size(Image.new("RGB", (width, height)), case["size_level"]) == work
        pixels = v12.vae_input(Image.new("RGB", (width, height)), work)
        assert list(pixels.shape) == case["vae_in_shape"]
        assert v12.restore_size(torch.zeros(work[1], work[0], 3, dtype=torch.uint8),
                                (width, height)).size == tuple(case["resize_back_to"])


def test_the_call_defaults_are_the_reference_ones():
    options = v12.V12Options()
    assert (options.steps, options.cfg_scale, options.renorm_threshold, options.renorm_power, options.size_level) == \
        (28, 6.0, 0.93, 0.4, 1024)
    assert options.rules is V12
