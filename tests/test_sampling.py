"""Sampler behaviour beyond the official loop: batches, img2img, masks, text-to-image, callbacks."""

import contextlib

import pytest
import torch

from step1x.sampling.denoise import (
    StepInfo,
    TextConditioning,
    denoise,
    get_schedule,
    make_noise,
    pack,
    position_ids,
    start_index,
    unpack,
)


def _latents(batch=1, seed=0, h=8, w=8):
    return make_noise((batch, 16, h, w), seed), make_noise((batch, 16, h, w), seed + 100)


@contextlib.contextmanager
def _transformer_inputs(model):
    """Collects the shape of the image tokens of every transformer call while inside."""
    shapes = []
    original = model.transformer
    model.transformer = lambda img, *a, **k: shapes.append(tuple(img.shape)) or original(img, *a, **k)
    try:
        yield shapes
    finally:
        del model.transformer


def _run(model, text, **kw):
    cond, uncond = text
    noise, ref = _latents(kw.pop("batch", 1))
    kw.setdefault("reference", ref)
    with torch.no_grad():
        return denoise(model, noise, cond, uncond, steps=kw.pop("steps", 4), compute_dtype=torch.float32, **kw)


def test_pack_and_unpack_are_inverse():
    x = torch.randn(2, 16, 6, 10)
    assert pack(x).shape == (2, 15, 64)
    assert torch.equal(unpack(pack(x), 6, 10), x)


def test_schedule_first_value_is_float32_rounded():
    import numpy as np

    assert get_schedule(10, 12)[0] == float(np.float32(0.99999994)) != 1.0


def test_schedule_shifts_towards_one_for_more_tokens():
    assert get_schedule(4, 4096)[1] > get_schedule(4, 256)[1]


@pytest.mark.parametrize("strength,expected", [(1.0, 0), (0.5, 5), (0.9, 0), (0.0, 10)])
def test_img2img_start_index_truncates_like_the_official_code(strength, expected):
    assert start_index(10, strength) == expected


def test_noise_is_seeded_and_device_independent():
    noise = make_noise((1, 16, 4, 4), 42)
    assert noise.device.type == "cpu" and noise.dtype == torch.float32
    assert torch.equal(noise, make_noise((1, 16, 4, 4), 42))
    assert not torch.equal(noise, make_noise((1, 16, 4, 4), 43))


def test_noise_is_comfyui_noise_for_the_same_seed():
    """ComfyUI's ``prepare_noise``: ``torch.randn`` in float32 on the CPU from ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[]):
        expected = torch.randn((2, 16, 4, 6), generator=torch.manual_seed(123), dtype=torch.float32, device="cpu")
    assert torch.equal(make_noise((2, 16, 4, 6), 123), expected)


def test_reference_ids_follow_the_noisy_ids():
    ids = position_ids(1, 2, 3, base=1.0)
    assert ids[0, 4].tolist() == [1.0, 2.0, 2.0]


def test_batch_of_two_equals_two_single_runs(tiny_dit, tiny_text):
    cond, uncond = tiny_text
    noise = make_noise((2, 16, 8, 8), 0)
    ref = make_noise((2, 16, 8, 8), 5)
    with torch.no_grad():
        both = denoise(tiny_dit, noise, cond, uncond, reference=ref, steps=3, compute_dtype=torch.float32)
        first = denoise(tiny_dit, noise[:1], cond, uncond, reference=ref[:1], steps=3, compute_dtype=torch.float32)
        second = denoise(tiny_dit, noise[1:], cond, uncond, reference=ref[1:], steps=3, compute_dtype=torch.float32)
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=0)


def test_sequential_cfg_equals_the_joint_batch(tiny_dit, tiny_text):
    joint = _run(tiny_dit, tiny_text)
    sequential = _run(tiny_dit, tiny_text, sequential_cfg=True)
    torch.testing.assert_close(sequential, joint, atol=1e-5, rtol=0)


def test_without_uncond_the_model_runs_on_the_cond_batch_only(tiny_dit, tiny_text):
    cond, _ = tiny_text
    noise, ref = _latents()
    with _transformer_inputs(tiny_dit) as shapes, torch.no_grad():
        denoise(tiny_dit, noise, cond, None, reference=ref, steps=2, compute_dtype=torch.float32)
    assert [rows for rows, _, _ in shapes] == [1, 1]


def test_strength_zero_returns_the_start_latent(tiny_dit, tiny_text):
    noise, ref = _latents()
    init = make_noise((1, 16, 8, 8), 7)
    with torch.no_grad():
        out = denoise(tiny_dit, noise, *tiny_text, reference=ref, init_latent=init, steps=4, strength=0.0,
                      compute_dtype=torch.float32)
    torch.testing.assert_close(out, init, atol=1e-6, rtol=0)


def test_partial_strength_runs_fewer_steps(tiny_dit, tiny_text):
    seen = []
    _run(tiny_dit, tiny_text, steps=10, strength=0.5, callback=seen.append)
    assert len(seen) == 5 and seen[0].total == 5


def test_empty_mask_keeps_the_reference_everywhere(tiny_dit, tiny_text):
    noise, ref = _latents()
    with torch.no_grad():
        out = denoise(tiny_dit, noise, *tiny_text, reference=ref, keep_mask=torch.zeros(1, 1, 8, 8), steps=3,
                      compute_dtype=torch.float32)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_full_mask_changes_nothing(tiny_dit, tiny_text):
    torch.testing.assert_close(_run(tiny_dit, tiny_text, keep_mask=torch.ones(1, 1, 8, 8)), _run(tiny_dit, tiny_text),
                               atol=1e-6, rtol=0)


def test_half_mask_keeps_only_the_unmasked_half(tiny_dit, tiny_text):
    noise, ref = _latents()
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    with torch.no_grad():
        out = denoise(tiny_dit, noise, *tiny_text, reference=ref, keep_mask=mask, steps=3, compute_dtype=torch.float32)
    torch.testing.assert_close(out[..., 4:], ref[..., 4:], atol=1e-6, rtol=0)
    assert (out[..., :4] - ref[..., :4]).abs().max() > 0.1


def test_text_to_image_has_no_reference_tokens(tiny_dit, tiny_text):
    with _transformer_inputs(tiny_dit) as shapes:
        out = _run(tiny_dit, tiny_text, reference=None, steps=2)
    assert out.shape == (1, 16, 8, 8) and [tokens for _, tokens, _ in shapes] == [16, 16]


def test_callback_sees_every_step_and_can_cancel(tiny_dit, tiny_text):
    seen: list[StepInfo] = []

    def cancel_after_two(info):
        seen.append(info)
        if info.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_dit, tiny_text, steps=5, callback=cancel_after_two)
    assert [s.step for s in seen] == [0, 1] and seen[0].latent.shape == (1, 16, 8, 8)


def test_bf16_sampling_stays_close_to_fp32(tiny_dit, tiny_text):
    cond, uncond = tiny_text
    noise, ref = _latents()
    with torch.no_grad():
        ref32 = denoise(tiny_dit, noise, cond, uncond, reference=ref, steps=3, compute_dtype=torch.float32)
        out16 = denoise(tiny_dit, noise, cond, uncond, reference=ref, steps=3, compute_dtype=torch.bfloat16)
    assert out16.dtype == torch.float32
    assert ((out16 - ref32).norm() / ref32.norm()) < 5e-2


def test_mismatched_reference_size_is_refused(tiny_dit, tiny_text):
    with pytest.raises(ValueError, match="reference latent is"):
        _run(tiny_dit, tiny_text, reference=make_noise((1, 16, 4, 4), 0))


def test_prompt_batch_must_match_image_batch(tiny_dit):
    cond = TextConditioning(torch.zeros(3, 24, 48), torch.ones(3, 24, dtype=torch.long))
    with pytest.raises(ValueError, match="3 prompts but the batch has 2"):
        denoise(tiny_dit, make_noise((2, 16, 8, 8), 0), cond, None, steps=1, compute_dtype=torch.float32)
