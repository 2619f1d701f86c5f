"""step1x.stepwise under the v1.2 rules, as the native MODEL runs v1.2 in ComfyUI, on the tiny v1.2 model (fp32) with
cond and uncond of unequal text lengths: stepped with the v1.2 Euler rule the pieces are ``denoise`` with the v1.2
rules bit for bit; driven like ComfyUI's Euler sampler (which recovers ``v`` from the denoised estimate) they agree to
1e-5 of the latent's scale.

Why relative: ComfyUI hands each side to the CFG function as ``x - denoised`` in float32, which rounds by half an ulp
of the latent; the guidance multiplies those errors by about ``2 * cfg - 1``. The tiny v1.2 model's latents reach
about 11, where the round trip costs about 1.6e-5 (1.5e-6 of the scale) after four steps."""

import pytest
import torch
from safetensors.torch import load_file

from step1x import stepwise
from step1x.checkpoints.loading import load_dit
from step1x.sampling.denoise import TextConditioning, denoise, guidance, make_noise, pack, unpack
from step1x.sampling.rules import OFFICIAL, V12, diffusers_schedule

F32 = torch.float32
RELATIVE = 1e-5
STEPS = 4


def assert_round_trip(ours, plain):
    gap = (ours - plain).abs().max().item()
    assert gap <= RELATIVE * max(1.0, plain.abs().max().item()), f"{gap:.3g} from denoise"


@pytest.fixture(scope="module")
def dit(v12_models):
    return load_dit(v12_models, compute_dtype=F32)


@pytest.fixture(scope="module")
def texts(v12_dir):
    ref = load_file(v12_dir / "denoise_v12.safetensors")

    def side(name, n=None):
        get = lambda key: ref[f"prompt.{name}.{key}"]  # noqa: E731
        text = TextConditioning(get("embedding"), get("mask"), get("txt_ids"), get("text_embeds"), get("text_masks"))
        n = n or text.llm_embedding.shape[1]
        return TextConditioning(text.llm_embedding[:, :n], text.mask[:, :n], text.txt_ids[:n][None],
                                text.text_embeds[:, :n], text.text_mask[:, :n])

    cond, uncond = side("cond"), side("uncond", 150)
    assert cond.llm_embedding.shape[1] != uncond.llm_embedding.shape[1]
    return cond, uncond


def comfy_euler(model, noise, cond, uncond, reference, sigmas, scale, threshold, rules, start=None):
    """ComfyUI's sample_euler with the model's CFG function, written out (one evaluation per side, as ComfyUI runs
    conditionings of unequal length)."""
    x = noise if start is None else sigmas[0] * noise + (1.0 - sigmas[0]) * start
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].reshape(1).expand(x.shape[0])
        cond_x0 = stepwise.denoised(model, x, sigma, cond, reference, compute_dtype=F32)
        uncond_x0 = stepwise.denoised(model, x, sigma, uncond, reference, compute_dtype=F32)
        x0 = x - stepwise.guided_eps(x - cond_x0, x - uncond_x0, scale, sigma, threshold, rules)
        x = x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def test_stepped_by_the_v12_euler_rule_the_pieces_are_the_v12_denoise_bit_for_bit(dit, texts):
    noise, ref = make_noise((1, 16, 8, 8), 0), make_noise((1, 16, 8, 8), 1)
    sigmas = stepwise.sigmas(STEPS, 8, 8, rules=V12).tolist()
    with torch.no_grad():
        plain = denoise(dit, noise, *texts, reference=ref, steps=STEPS, compute_dtype=F32)
        x = noise
        for t, t_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            cond, uncond = (stepwise.velocity(dit, x, t, text, ref, compute_dtype=F32, device=x.device)
                            for text in texts)
            guided = guidance(pack(cond), pack(uncond), 6.0, V12.renorm_active(t, 0.93))
            x = V12.euler(x, unpack(guided, 8, 8), t, t_next)
    assert torch.equal(x, plain)


@pytest.mark.parametrize("threshold", [0.93, 1.0])
def test_euler_on_the_pieces_is_the_v12_denoise_with_unequal_text_lengths(dit, texts, threshold):
    noise, ref = make_noise((1, 16, 8, 8), 0), make_noise((1, 16, 8, 8), 1)
    with torch.no_grad():
        plain = denoise(dit, noise, *texts, reference=ref, steps=STEPS, renorm_threshold=threshold, compute_dtype=F32)
        ours = comfy_euler(dit, noise, *texts, ref, stepwise.sigmas(STEPS, 8, 8, rules=V12), 6.0, threshold, V12)
    assert_round_trip(ours, plain)


def test_the_official_renorm_option_is_followed_too(dit, texts):
    noise, ref = make_noise((1, 16, 8, 8), 2), make_noise((1, 16, 8, 8), 3)
    rules = V12.with_official_renorm()
    with torch.no_grad():
        plain = denoise(dit, noise, *texts, reference=ref, steps=STEPS, compute_dtype=F32, rules=rules)
        every = denoise(dit, noise, *texts, reference=ref, steps=STEPS, compute_dtype=F32)
        ours = comfy_euler(dit, noise, *texts, ref, stepwise.sigmas(STEPS, 8, 8, rules=V12), 6.0, 0.93, rules)
    assert_round_trip(ours, plain)
    assert (plain - every).abs().max() > 1e-3, "v1.2 renorms at every step, the official rule only while t > 0.93"


def test_img2img_and_text_to_image(dit, texts):
    noise, ref = make_noise((1, 16, 8, 8), 4), make_noise((1, 16, 8, 8), 5)
    with torch.no_grad():
        plain = denoise(dit, noise, *texts, reference=ref, steps=STEPS, strength=0.6, compute_dtype=F32)
        ours = comfy_euler(dit, noise, *texts, ref, stepwise.sigmas(STEPS, 8, 8, 0.6, V12), 6.0, 0.93, V12, start=ref)
        t2i = denoise(dit, noise, *texts, steps=STEPS, compute_dtype=F32)
        ours_t2i = comfy_euler(dit, noise, *texts, None, stepwise.sigmas(STEPS, 8, 8, rules=V12), 6.0, 0.93, V12)
    assert_round_trip(ours, plain)
    assert_round_trip(ours_t2i, t2i)


def test_a_padded_batch_of_both_sides_is_cut_to_each_rows_text(dit, texts):
    """ComfyUI batches the sides when their shapes match; each row is evaluated alone on its valid tokens."""
    cond, uncond = texts
    length = cond.llm_embedding.shape[1]

    def pad(t):
        grown = t.new_zeros((1, length) + tuple(t.shape[2:]))
        grown[:, :t.shape[1]] = t
        return grown

    fields = ("llm_embedding", "mask", "txt_ids", "text_embeds", "text_mask")
    both = TextConditioning(*(torch.cat([getattr(cond, f), pad(getattr(uncond, f))]) for f in fields))
    x, ref = make_noise((2, 16, 8, 8), 6), make_noise((1, 16, 8, 8), 7)
    sigma = torch.tensor([0.8, 0.8])
    with torch.no_grad():
        joint = stepwise.denoised(dit, x, sigma, both, ref, compute_dtype=F32)
        first = stepwise.denoised(dit, x[:1], sigma[:1], cond, ref, compute_dtype=F32)
        second = stepwise.denoised(dit, x[1:], sigma[1:], uncond, ref, compute_dtype=F32)
    torch.testing.assert_close(joint, torch.cat([first, second]), rtol=0, atol=1e-6)


def test_the_schedule_follows_the_rules():
    assert stepwise.sigmas(28, 64, 64, rules=V12).tolist() == diffusers_schedule(28, 1024)
    assert torch.equal(stepwise.sigmas(28, 64, 64, rules=OFFICIAL), stepwise.official_sigmas(28, 64, 64))
    assert (stepwise.sigmas(28, 64, 64, rules=V12) - stepwise.official_sigmas(28, 64, 64)).abs().max() < 1e-6
