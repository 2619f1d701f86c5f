"""The official sampler taken apart for step-by-step samplers (step1x.stepwise): driven the way ComfyUI's Euler
sampler drives a model (``d = (x - denoised) / sigma``, ``x += d * dt``), the pieces reproduce ``denoise``."""

import math

import pytest
import torch

from step1x.checkpoints.lora import _kohya_names, _translate, linear_shapes, module_names
from step1x.models.configs import TINY_DIT
from step1x.models.model import Step1XEdit
from step1x.sampling.denoise import TextConditioning, denoise, get_schedule, guidance, pack, unpack
from step1x.stepwise import denoised, guided_eps, image_tokens, official_sigmas, schedule_mu

F32 = torch.float32


def _inputs(seed=0, batch=1, h=6, w=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, h, w, generator=g), torch.randn(batch, 16, h, w, generator=g)


def comfy_euler(model, noise, cond, uncond, reference, sigmas, scale, threshold, start=None):
    """ComfyUI's sample_euler + CFG function, written out: what the native MODEL runs under KSampler."""
    x = noise if start is None else sigmas[0] * noise + (1.0 - sigmas[0]) * start
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].reshape(1).expand(x.shape[0])
        cond_x0 = denoised(model, x, sigma, cond, reference, compute_dtype=F32)
        uncond_x0 = denoised(model, x, sigma, uncond, reference, compute_dtype=F32)
        x0 = x - guided_eps(x - cond_x0, x - uncond_x0, scale, sigma, threshold)
        x = x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


@pytest.mark.parametrize("threshold", [0.93, 1.0])
def test_euler_on_the_stepwise_pieces_is_the_official_denoise(tiny_dit, tiny_text, threshold):
    noise, ref = _inputs()
    with torch.no_grad():
        official = denoise(tiny_dit, noise, *tiny_text, reference=ref, steps=6, cfg_scale=6.0,
                           renorm_threshold=threshold, compute_dtype=F32)
        ours = comfy_euler(tiny_dit, noise, *tiny_text, ref, official_sigmas(6, 6, 8), 6.0, threshold)
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-5)


def test_img2img_starts_at_the_official_step_from_the_noised_start(tiny_dit, tiny_text):
    noise, ref = _inputs(seed=1)
    with torch.no_grad():
        official = denoise(tiny_dit, noise, *tiny_text, reference=ref, steps=6, strength=0.6, compute_dtype=F32)
        sigmas = official_sigmas(6, 6, 8, 0.6)
        ours = comfy_euler(tiny_dit, noise, *tiny_text, ref, sigmas, 6.0, 0.93, start=ref)
    assert len(sigmas) == 6 - int((1 - 0.6) * 6) + 1
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-5)


def test_text_to_image_has_no_reference(tiny_dit, tiny_text):
    noise, _ = _inputs(seed=2)
    with torch.no_grad():
        official = denoise(tiny_dit, noise, *tiny_text, steps=4, compute_dtype=F32)
        ours = comfy_euler(tiny_dit, noise, *tiny_text, None, official_sigmas(4, 6, 8), 6.0, 0.93)
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-5)


def test_rows_of_one_batch_keep_their_own_text_and_time(tiny_dit, tiny_text):
    """ComfyUI may batch cond and uncond rows, and rows at different times: each row is its own evaluation."""
    cond, uncond = tiny_text
    x, ref = _inputs(seed=3, batch=2)
    both = TextConditioning(torch.cat([cond.llm_embedding, uncond.llm_embedding]), torch.cat([cond.mask, uncond.mask]))
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        joint = denoised(tiny_dit, x, sigma, both, ref, compute_dtype=F32)
        first = denoised(tiny_dit, x[:1], sigma[:1], cond, ref[:1], compute_dtype=F32)
        second = denoised(tiny_dit, x[1:], sigma[1:], uncond, ref[1:], compute_dtype=F32)
    torch.testing.assert_close(joint, torch.cat([first, second]), rtol=0, atol=1e-6)


def test_the_denoised_estimate_is_one_step_to_time_zero(tiny_dit, tiny_text):
    x, ref = _inputs(seed=4)
    with torch.no_grad():
        step = denoise(tiny_dit, x, tiny_text[0], None, reference=ref, timesteps=[0.7, 0.0], compute_dtype=F32)
        ours = denoised(tiny_dit, x, torch.tensor([0.7]), tiny_text[0], ref, compute_dtype=F32)
    assert torch.equal(ours, step)


def test_guidance_on_eps_is_the_official_guidance_on_velocities():
    g = torch.Generator().manual_seed(5)
    v_c, v_u = torch.randn(2, 16, 4, 6, generator=g) * 3, torch.randn(2, 16, 4, 6, generator=g) * 3
    sigma = torch.tensor([0.95, 0.95])
    eps = guided_eps(0.95 * v_c, 0.95 * v_u, 6.0, sigma, 0.93)
    official = unpack(guidance(pack(v_c), pack(v_u), 6.0, renorm=True), 4, 6)  # t = 0.95 > 0.93
    torch.testing.assert_close(eps / 0.95, official, rtol=1e-5, atol=1e-5)
    plain = guided_eps(0.9 * v_c, 0.9 * v_u, 6.0, torch.tensor([0.9, 0.9]), 0.93)
    torch.testing.assert_close(plain, 0.9 * (v_u + 6.0 * (v_c - v_u)), rtol=1e-5, atol=1e-5)


def test_official_sigmas_follow_the_latent_size_and_denoise():
    assert official_sigmas(28, 64, 64).tolist() == get_schedule(28, 1024)
    assert official_sigmas(28, 128, 96).tolist() == get_schedule(28, 3072)
    assert official_sigmas(10, 64, 64, 0.55).tolist() == get_schedule(10, 1024)[4:]
    assert official_sigmas(4, 6, 8).dtype == torch.float32


@pytest.mark.parametrize("tokens", [12, 256, 1024, 3072, 4096, 8192])
def test_schedule_mu_is_the_shift_of_the_official_schedule(tokens):
    midpoint = get_schedule(2, tokens)[1]  # t = 0.5: e^mu / (e^mu + 1)
    assert math.isclose(schedule_mu(tokens), math.log(midpoint / (1 - midpoint)), abs_tol=1e-5)
    assert image_tokens(64, 96) == 32 * 48


def test_every_lora_module_name_listed_is_read_onto_that_layer():
    with torch.device("meta"):
        shapes = linear_shapes(Step1XEdit(TINY_DIT))
    names, kohya = module_names(shapes), _kohya_names(shapes)
    for name, (module, part) in names.items():
        assert _translate(name, shapes, kohya)[1:] == (module, part), name
    assert names["lora_unet_double_blocks_0_img_attn_qkv"] == ("double_blocks.0.img_attn.qkv", None)
    assert names["transformer.transformer_blocks.1.attn.to_k"] == ("double_blocks.1.img_attn.qkv", 1)
    assert names["single_transformer_blocks.0.proj_mlp"] == ("single_blocks.0.linear1", 3)
    assert names["blocks.0.attn.b_to_out"] == ("double_blocks.0.txt_attn.proj", None)
    assert names["diffusion_model.connector.S.input_embedder"] == ("connector.S.input_embedder", None)


def test_in_bfloat16_the_pieces_keep_the_velocitys_precision(tiny_dit):
    """The estimate is formed in float32, so recovering ``v`` from it loses nothing: the Euler loop in bf16 stays
    at least as close to the float32 result as the official bf16 loop, which carries the latent in bf16."""
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(2, 24, 48, generator=g) * 5
    mask = torch.ones(2, 24, dtype=torch.long)
    cond, uncond = TextConditioning(emb[:1], mask[:1]), TextConditioning(emb[1:], mask[1:])
    noise, ref = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 16, 16, 16, generator=g)
    with torch.no_grad():
        exact = denoise(tiny_dit, noise, cond, uncond, reference=ref, steps=12, compute_dtype=F32)
        official = denoise(tiny_dit, noise, cond, uncond, reference=ref, steps=12, compute_dtype=torch.bfloat16)
        sigmas = official_sigmas(12, 16, 16)
        x = noise
        for i in range(12):
            sigma = sigmas[i].reshape(1)
            c = denoised(tiny_dit, x, sigma, cond, ref, compute_dtype=torch.bfloat16)
            u = denoised(tiny_dit, x, sigma, uncond, ref, compute_dtype=torch.bfloat16)
            x0 = x - guided_eps(x - c, x - u, 6.0, sigma, 0.93)
            x = x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    assert (x - exact).abs().max() <= (official - exact).abs().max()
