"""RegionE beyond the reference run: other step counts, batches, masks, LoRA, the work count and bad settings.

The reference accepts 28 steps and batch 1 only. The stated rules: defaults scale with the step count, the decay
table is read as a rate over time for other schedules, and a batch runs row by row with a partition per row."""

import math

import pytest
import torch
from safetensors.torch import save_file

from helpers import constructed_edit
from step1x.checkpoints.loading import cast_model
from step1x.checkpoints.lora import apply_lora, linear_shapes, load_lora
from step1x.models.configs import TINY_DIT, with_version
from step1x.models.model import Step1XEdit
from step1x.sampling.denoise import TextConditioning, denoise, get_schedule, pack
from step1x.sampling.regione import RegionETrace, regione_denoise
from step1x.sampling.regione_rules import (
    DecayRatios,
    RegionEConfig,
    StepPlan,
    decay_table,
    parse_refresh,
    plan_steps,
)

F32 = dict(compute_dtype=torch.float32, device=torch.device("cpu"))
RECT = (3, 8, 4, 11)


def _regione(model, tiny_text, noise, reference, trace=None, **kwargs):
    cond, uncond = tiny_text
    with torch.no_grad():
        return regione_denoise(model, noise, cond, uncond, reference=reference, trace=trace, **F32, **kwargs)


def _plain(model, tiny_text, noise, reference, **kwargs):
    cond, uncond = tiny_text
    with torch.no_grad():
        return denoise(model, noise, cond, uncond, reference=reference, **F32, **kwargs)


def _latents(fn, *args, **kwargs):
    out = []
    fn(*args, callback=lambda info: out.append(info.latent.clone()), **kwargs)
    return out


# ------------------------------------------------------------------------------------------------- plan


def test_default_plan_is_the_reference_plan_at_28_steps():
    assert plan_steps(RegionEConfig(), 28) == StepPlan(28, warmup=6, post_steps=2, refresh=(15,))


@pytest.mark.parametrize("steps,warmup,post,refresh", [
    (50, 11, 4, (28,)), (20, 4, 1, (10,)), (10, 2, 1, (5,)), (4, 1, 0, ()), (2, 1, 0, ()),
])
def test_default_steps_scale_with_the_step_count(steps, warmup, post, refresh):
    plan = plan_steps(RegionEConfig(), steps)
    assert (plan.warmup, plan.post_steps, plan.refresh) == (warmup, post, refresh)
    assert plan.active


def test_explicit_steps_are_used_as_given():
    plan = plan_steps(RegionEConfig(warmup_steps=3, post_steps=0, refresh_steps=(8, 12)), 16)
    assert (plan.warmup, plan.post_steps, plan.refresh, plan.post) == (3, 0, (7, 11), 16)
    assert [plan.jump_target(i) for i in (2, 7, 11)] == [7, 11, 16]


def test_a_refresh_step_outside_the_limits_is_refused():
    with pytest.raises(ValueError, match=r"refresh step\(s\) \[7\] do not fit 28 steps .* above 7 and at most 25"):
        plan_steps(RegionEConfig(refresh_steps=(7,)), 28)


def test_adjacent_refresh_steps_are_refused():
    with pytest.raises(ValueError, match="must not be adjacent"):
        plan_steps(RegionEConfig(refresh_steps=(12, 13)), 28)


def test_refresh_steps_parse_from_the_reference_comma_list():
    assert parse_refresh("16") == (16,) and parse_refresh("12, 20") == (12, 20) and parse_refresh("") == ()
    with pytest.raises(ValueError, match="comma list"):
        parse_refresh("twelve")


@pytest.mark.parametrize("kwargs,message", [
    ({"threshold": 1.5}, "cosine similarity within"), ({"cache_threshold": -0.1}, "cache_threshold must be"),
    ({"region": "box"}, "region must be one of"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RegionEConfig(**kwargs)


def test_one_step_leaves_no_room_for_regions_and_runs_the_plain_sampler(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    assert not plan_steps(RegionEConfig(), 1).active
    trace = RegionETrace()
    out = _regione(tiny_dit, tiny_text, noise, reference, trace, steps=1)
    assert trace.rows[0].kinds == ["full"]
    assert torch.equal(out, _plain(tiny_dit, tiny_text, noise, reference, steps=1))


# ------------------------------------------------------------------------------------------- decay ratios


def test_decay_ratios_at_28_steps_are_the_reference_formula():
    sigmas = torch.tensor(get_schedule(28, 192))
    ratio, inputs = DecayRatios(decay_table("v1.1"), sigmas)(7)
    t = sigmas * 1000
    assert ratio == decay_table("v1.1")[6].float() * (1 + (t[7] - t[6]) / 1000)
    assert inputs["gamma_index"] == 6


def test_other_step_counts_integrate_the_decay_over_their_own_time_span():
    """56 steps nest in the 28-step grid: two half steps together decay like the reference step they split."""
    ref = torch.tensor(get_schedule(28, 192))
    half = DecayRatios(decay_table("v1.1"), torch.tensor(get_schedule(56, 192)), ref)
    whole = DecayRatios(decay_table("v1.1"), ref)
    for j in range(1, 27):
        together = float(half(2 * j - 1)[0]) * float(half(2 * j)[0])
        assert math.isclose(together, float(whole(j)[0]), rel_tol=2e-6), j


# ------------------------------------------------------------------------------------------------- runs


def test_other_step_counts_follow_the_scaled_plan(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    trace = RegionETrace()
    out = _regione(tiny_dit, tiny_text, noise, reference, trace, steps=20)
    kinds = trace.rows[0].kinds
    assert kinds[:4] == ["full", "full", "full", "partition"] and kinds[4] == "region"
    assert kinds[10] == "refresh" and kinds[19] == "full"
    assert set(kinds[4:10] + kinds[11:19]) <= {"region", "cached"} and "cached" in kinds
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def default_run(tiny_dit):
    """The reference settings at 28 steps on the constructed edit: RegionE's and the plain sampler's latents."""
    g = torch.Generator().manual_seed(1)
    emb, mask = torch.randn(2, 24, 48, generator=g), torch.zeros(2, 24, dtype=torch.long)
    mask[0, :17], mask[1, :6] = 1, 1
    text = (TextConditioning(emb[:1], mask[:1]), TextConditioning(emb[1:], mask[1:]))
    noise, reference = constructed_edit()
    trace = RegionETrace()
    mine = _latents(_regione, tiny_dit, text, noise, reference, trace)
    return trace, mine, _latents(_plain, tiny_dit, text, noise, reference)


def test_warm_up_steps_are_the_plain_sampler_and_the_fill_pass_is_the_plain_forward(default_run):
    trace, mine, plain = default_run
    for i in range(5):
        assert torch.equal(mine[i], plain[i]), i
    edited = trace.rows[0].partition.edited
    assert torch.equal(pack(mine[5])[:, edited], pack(plain[5])[:, edited])


def test_the_partition_finds_the_constructed_region(default_run):
    grid = default_run[0].rows[0].partition.mask.reshape(12, 16)
    expected = torch.zeros(12, 16, dtype=torch.bool)
    expected[2:9, 3:12] = True  # the 5x7 rectangle eroded by one and dilated by two
    assert torch.equal(grid, expected)


def test_the_result_stays_close_to_the_plain_sampler(default_run):
    _, mine, plain = default_run
    assert (mine[-1] - plain[-1]).norm() / plain[-1].norm() < 0.02


def test_work_is_counted_per_fed_token(default_run):
    trace = default_run[0]
    row, n, text = trace.rows[0], 192, 24
    edited = row.partition.edited.numel()
    full = sum(k in ("full", "partition", "refresh") for k in row.kinds)
    assert trace.plain_token_evals == 28 * 2 * (text + 2 * n)
    assert trace.token_evals == full * 2 * (text + 2 * n) + row.kinds.count("region") * 2 * (text + edited)
    assert trace.work_ratio < 0.45


def test_a_batch_runs_row_by_row_with_a_partition_per_row(tiny_dit, tiny_text):
    a, ref_a = constructed_edit(rect=RECT, seed=0)
    b, ref_b = constructed_edit(rect=(6, 10, 1, 6), seed=1)
    trace = RegionETrace()
    both = _regione(tiny_dit, tiny_text, torch.cat([a, b]), torch.cat([ref_a, ref_b]), trace, steps=12)
    alone = [_regione(tiny_dit, tiny_text, a, ref_a, steps=12), _regione(tiny_dit, tiny_text, b, ref_b, steps=12)]
    assert torch.equal(both[:1], alone[0]) and torch.equal(both[1:], alone[1])
    assert not torch.equal(trace.rows[0].partition.edited, trace.rows[1].partition.edited)


def test_separate_cfg_passes_keep_their_own_caches_and_give_the_batched_result(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    batched, separate = RegionETrace(), RegionETrace()
    a = _regione(tiny_dit, tiny_text, noise, reference, batched, steps=12)
    b = _regione(tiny_dit, tiny_text, noise, reference, separate, steps=12, sequential_cfg=True)
    assert separate.rows[0].kinds == batched.rows[0].kinds
    assert separate.token_evals == batched.token_evals
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_img2img_plans_the_steps_it_runs(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    trace = RegionETrace()
    out = _regione(tiny_dit, tiny_text, noise, reference, trace, strength=0.5)
    assert len(trace.rows[0].kinds) == 14 and trace.rows[0].plan == plan_steps(RegionEConfig(), 14)
    assert torch.isfinite(out).all()


def test_the_callback_counts_steps_over_the_rows(tiny_dit, tiny_text):
    noise, reference = constructed_edit(batch=2)
    seen = []
    _regione(tiny_dit, tiny_text, noise, reference, steps=8,
             callback=lambda info: seen.append((info.step, info.total, tuple(info.latent.shape))))
    assert seen == [(i, 16, (1, 16, 24, 32)) for i in range(16)]


@pytest.mark.parametrize("threshold,edited", [(-1.0, 0), (1.0, 192)])
def test_nothing_or_everything_edited(tiny_dit, tiny_text, threshold, edited):
    noise, reference = constructed_edit()
    trace = RegionETrace()
    out = _regione(tiny_dit, tiny_text, noise, reference, trace, steps=10, config=RegionEConfig(threshold=threshold))
    assert trace.rows[0].partition.edited.numel() == edited
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ masks


def _keep(rows=12, cols=16, rect=(2, 6, 2, 8)):
    mask = torch.zeros(1, 1, rows * 2, cols * 2)
    r0, r1, c0, c1 = rect
    mask[..., 2 * r0:2 * r1, 2 * c0:2 * c1] = 1.0
    mask[..., 2 * r0, 2 * c1] = 0.5  # one latent pixel of the next token: that token is touched too
    return mask


def test_a_mask_can_seed_the_edited_region(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    keep = _keep()
    trace = RegionETrace()
    out = _regione(tiny_dit, tiny_text, noise, reference, trace, steps=10, keep_mask=keep,
                   config=RegionEConfig(region="mask"))
    touched = pack(keep.expand(-1, 16, -1, -1))[0].amax(-1) > 0
    assert torch.equal(trace.rows[0].partition.mask, touched) and touched.sum() == 4 * 6 + 1
    outside = keep.expand(-1, 16, -1, -1) == 0
    assert torch.equal(out[outside], reference[outside])


def test_with_a_mask_the_similarity_partition_stays_inside_it(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    keep = _keep()
    trace = RegionETrace()
    _regione(tiny_dit, tiny_text, noise, reference, trace, steps=10, keep_mask=keep)
    edited = trace.rows[0].partition.mask
    touched = pack(keep.expand(-1, 16, -1, -1))[0].amax(-1) > 0
    assert edited.any() and not (edited & ~touched).any()


def test_mask_steps_before_the_partition_are_the_plain_masked_sampler(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    keep = _keep()
    mine = _latents(_regione, tiny_dit, tiny_text, noise, reference, keep_mask=keep, steps=12)
    plain = _latents(_plain, tiny_dit, tiny_text, noise, reference, keep_mask=keep, steps=12)
    for i in range(2):
        assert torch.equal(mine[i], plain[i]), i


# ------------------------------------------------------------------------------------------------- LoRA


def _lora_file(path, model):
    shapes, tensors = linear_shapes(model), {}
    g = torch.Generator().manual_seed(5)
    for layer in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"):
        name = "lora_unet_" + layer.replace(".", "_")
        out, inp = shapes[layer]
        tensors |= {f"{name}.lora_up.weight": torch.randn(out, 4, generator=g) * 0.1,
                    f"{name}.lora_down.weight": torch.randn(4, inp, generator=g) * 0.1}
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn"])
def test_lora_merged_or_as_a_branch_applies_in_region_steps(tmp_path, tiny_text, weight_dtype):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cast_model(Step1XEdit(with_version(TINY_DIT, "v1.1")).eval(), torch.float32, weight_dtype)
    noise, reference = constructed_edit()
    before, trace = _regione(model, tiny_text, noise, reference, steps=10), RegionETrace()
    apply_lora(model, load_lora(_lora_file(tmp_path / "l.safetensors", model), model), 1.0)
    mine = _latents(_regione, model, tiny_text, noise, reference, trace, steps=10)
    plain = _latents(_plain, model, tiny_text, noise, reference, steps=10)
    assert torch.equal(mine[0], plain[0]) and "region" in trace.rows[0].kinds
    assert not torch.allclose(mine[-1], before, atol=1e-3)


# ----------------------------------------------------------------------------------------------- errors


def test_text_to_image_is_refused(tiny_dit, tiny_text):
    noise, _ = constructed_edit()
    with pytest.raises(ValueError, match="RegionE edits a reference image"):
        _regione(tiny_dit, tiny_text, noise, None)


def test_the_mask_region_needs_a_mask(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    with pytest.raises(ValueError, match='region "mask" takes the edited region from a mask'):
        _regione(tiny_dit, tiny_text, noise, reference, config=RegionEConfig(region="mask"))


def test_regione_and_teacache_together_are_refused(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    with pytest.raises(ValueError, match="RegionE and TeaCache"):
        _plain(tiny_dit, tiny_text, noise, reference, regione=RegionEConfig(), teacache=0.2)


def test_denoise_with_regione_is_regione_denoise(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    a = _plain(tiny_dit, tiny_text, noise, reference, steps=8, regione=RegionEConfig())
    assert torch.equal(a, _regione(tiny_dit, tiny_text, noise, reference, steps=8))


def test_a_v12_conditioning_on_a_v11_dit_is_refused_as_by_the_plain_sampler(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    cond, uncond = tiny_text
    v12 = TextConditioning(cond.llm_embedding, cond.mask, txt_ids=torch.zeros(1, 24, 3))
    with pytest.raises(ValueError, match="carries v1.2 text positions.*but the DiT is Step1X-Edit v1.1"):
        _regione(tiny_dit, (v12, uncond), noise, reference)


def test_without_cfg_one_pass_runs(tiny_dit, tiny_text):
    noise, reference = constructed_edit()
    trace = RegionETrace()
    with torch.no_grad():
        out = regione_denoise(tiny_dit, noise, tiny_text[0], None, reference=reference, steps=10, trace=trace, **F32)
    assert "region" in trace.rows[0].kinds and trace.plain_token_evals == 10 * (24 + 2 * 192)
    assert torch.isfinite(out).all()
