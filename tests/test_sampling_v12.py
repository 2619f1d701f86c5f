"""The v1.2 sampler rules beyond the reference run: batches, prompts of different lengths, the renorm
option, TeaCache, text-to-image, and mixing a v1.2 conditioning with another version's DiT."""

import pytest
import torch
from safetensors.torch import load_file

import step1x.sampling.denoise as denoise_module
from step1x.checkpoints.loading import load_dit, load_vae
from step1x.sampling import v12
from step1x.sampling.denoise import TextConditioning, denoise, make_noise
from step1x.sampling.rules import OFFICIAL, V12, rules_for


@pytest.fixture(scope="module")
def dit(v12_models):
    return load_dit(v12_models, compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def texts(v12_dir):
    ref = load_file(v12_dir / "denoise_v12.safetensors")

    def side(name):
        get = lambda key: ref[f"prompt.{name}.{key}"]  # noqa: E731
        return TextConditioning(get("embedding"), get("mask"), get("txt_ids"), get("text_embeds"), get("text_masks"))

    return side("cond"), side("uncond")


def _cut(text: TextConditioning, n: int) -> TextConditioning:
    return TextConditioning(text.llm_embedding[:, :n], text.mask[:, :n], text.txt_ids[:n], text.text_embeds[:, :n],
                            text.text_mask[:, :n])


REFERENCE = make_noise((2, 16, 8, 8), 9)


def _sample(dit, noise, cond, uncond, steps=3, rows=slice(None), **kw):
    with torch.no_grad():
        return denoise(dit, noise, cond, uncond, reference=REFERENCE[rows][:noise.shape[0]], steps=steps,
                       compute_dtype=torch.float32, **kw)


def test_the_v12_dit_samples_with_the_v12_rules_by_default():
    assert rules_for("v1.2") is V12 and rules_for("v1.1") is OFFICIAL and rules_for("v1.0") is OFFICIAL


def test_batch_rows_with_prompts_of_different_lengths_equal_each_row_alone(dit, texts):
    cond, uncond = texts
    short = _cut(cond, 200)
    noise = make_noise((2, 16, 8, 8), 0)
    both = _sample(dit, noise, [cond, short], uncond)
    first = _sample(dit, noise[:1], cond, uncond, rows=slice(0, 1))
    second = _sample(dit, noise[1:], short, uncond, rows=slice(1, 2))
    assert torch.equal(both, torch.cat([first, second]))


def test_a_padded_batch_is_cut_to_each_rows_mask(dit, texts):
    cond, uncond = texts
    length = cond.llm_embedding.shape[1]
    pad = lambda t: torch.cat([t, torch.zeros_like(t[:, :1]).expand(-1, length - 200, *t.shape[2:])], 1)  # noqa: E731
    short = _cut(cond, 200)
    padded = TextConditioning(
        torch.cat([cond.llm_embedding, pad(short.llm_embedding)]), torch.cat([cond.mask, pad(short.mask)]),
        torch.stack([cond.txt_ids, pad(short.txt_ids[None])[0]]), torch.cat([cond.text_embeds, pad(short.text_embeds)]),
        torch.cat([cond.text_mask, pad(short.text_mask)]))
    noise = make_noise((2, 16, 8, 8), 0)
    assert torch.equal(_sample(dit, noise, padded, uncond), _sample(dit, noise, [cond, short], uncond))


def test_a_mask_with_holes_is_refused(texts):
    cond, _ = texts
    holed = TextConditioning(cond.llm_embedding, cond.mask.clone(), cond.txt_ids, cond.text_embeds, cond.text_mask)
    holed.mask[0, 5] = 0
    with pytest.raises(ValueError, match="ones on the valid tokens, then zeros"):
        holed.row(0)


def _renorm_count(dit, texts, rules):
    calls = []
    divisor = denoise_module.renorm_divisor
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(denoise_module, "renorm_divisor", lambda n, k=0.4: calls.append(1) or divisor(n, k))
        _sample(dit, make_noise((1, 16, 8, 8), 0), *texts, steps=10, rules=rules)
    return len(calls)


def test_the_reference_renorm_acts_every_step_and_the_official_one_only_above_the_threshold(dit, texts):
    assert _renorm_count(dit, texts, V12) == 10
    assert _renorm_count(dit, texts, V12.with_official_renorm()) == 2
    assert v12.V12Options(official_renorm=True).rules == V12.with_official_renorm()


def test_teacache_keeps_one_cache_per_call(dit, texts):
    calls = []
    handle = dit.double_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        out = _sample(dit, make_noise((1, 16, 8, 8), 0), *texts, steps=5, teacache=1e9)
    finally:
        handle.remove()
    assert len(calls) == 4 and torch.isfinite(out).all()  # first and last step, cond and uncond


def test_text_to_image_has_no_reference_and_returns_the_asked_size(dit, v12_models, texts):
    shapes = []
    transformer = dit.transformer
    dit.transformer = lambda img, *a, **k: shapes.append(tuple(img.shape)) or transformer(img, *a, **k)
    try:
        image = v12.edit(dit, load_vae(v12_models), None, *texts, v12.V12Options(steps=2, size_level=64, seed=1),
                         size=(72, 40), dtype=torch.float32)
    finally:
        del dit.transformer
    assert image.size == (72, 40) and shapes == [(1, 8, 64)] * 4  # 64x32 px: 4x2 tokens, no reference tokens


def test_bf16_sampling_stays_close_to_fp32(dit, texts):
    noise = make_noise((1, 16, 8, 8), 0)
    out32 = _sample(dit, noise, *texts)
    with torch.no_grad():
        out16 = denoise(dit, noise, *texts, reference=REFERENCE[:1], steps=3, compute_dtype=torch.bfloat16)
    assert ((out16 - out32).norm() / out32.norm()) < 5e-2


def test_a_v12_conditioning_on_a_v11_dit_is_refused(tiny_dit, texts):
    with pytest.raises(ValueError, match="carries v1.2 text positions.* DiT is Step1X-Edit v1.1"):
        _sample(tiny_dit, make_noise((1, 16, 8, 8), 0), *texts)


def test_a_v12_conditioning_under_the_official_batching_is_refused(dit, texts):
    with pytest.raises(ValueError, match="official sampler rules run cond and uncond as one padded batch"):
        _sample(dit, make_noise((1, 16, 8, 8), 0), *texts, rules=OFFICIAL)


def test_a_v11_conditioning_on_the_v12_dit_is_refused(dit, tiny_text):
    with pytest.raises(ValueError, match="v1.2 needs text_embeds and text_mask"):
        _sample(dit, make_noise((1, 16, 8, 8), 0), *tiny_text)
