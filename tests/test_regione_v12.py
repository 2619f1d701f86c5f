"""RegionE on Step1X-Edit v1.2 beyond the reference run (which takes 28 steps and batch 1): every step count and
batch under the v1.2 rules, with a partition, a text and a K/V cache per row and per CFG side; no CFG; the
official-renorm option; the v1.2 edit function.

The tiny v1.2 DiT of the reference set, its recorded prompts cut to 40 (cond) and 25 (uncond) tokens, and edits
built like the fixture's (outside the edit the noise is 20 x the reference)."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import constructed_edit
from step1x.checkpoints.loading import load_dit, load_vae
from step1x.sampling import v12
from step1x.sampling.denoise import TextConditioning, denoise
from step1x.sampling.regione import RegionETrace, regione_denoise
from step1x.sampling.regione_rules import DecayRatios, RegionEConfig, decay_table, plan_steps
from step1x.sampling.rules import DIFFUSERS_V11, V12

STEPS = 12
N = 12 * 16
COND, UNCOND = 40, 25
F32 = dict(compute_dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def dit(v12_models):
    return load_dit(v12_models, compute_dtype=torch.float32)


def _cut(text: TextConditioning, n: int) -> TextConditioning:
    return TextConditioning(text.llm_embedding[:, :n], text.mask[:, :n], text.txt_ids[:n], text.text_embeds[:, :n],
                            text.text_mask[:, :n])


@pytest.fixture(scope="module")
def recorded(v12_dir):
    return load_file(v12_dir / "denoise_v12.safetensors")


@pytest.fixture(scope="module")
def texts(recorded):
    def side(name):
        get = lambda key: recorded[f"prompt.{name}.{key}"]  # noqa: E731
        return TextConditioning(get("embedding"), get("mask"), get("txt_ids"), get("text_embeds"), get("text_masks"))

    cond = _cut(side("cond"), COND)
    assert int(cond.text_mask.sum()) > 0  # quoted tokens: the text-token mapping takes part
    return cond, _cut(side("uncond"), UNCOND)


def _edit(seed=0, rect=(3, 8, 4, 11)):
    return constructed_edit(rect=rect, seed=seed, gain=20.0)


def _regione(dit, noise, reference, cond, uncond, trace=None, steps=STEPS, **kwargs):
    with torch.no_grad():
        return regione_denoise(dit, noise, cond, uncond, reference=reference, steps=steps, trace=trace, **F32,
                               **kwargs)


def _latents(sampler, dit, noise, reference, cond, uncond, **kwargs):
    out = []
    with torch.no_grad():
        sampler(dit, noise, cond, uncond, reference=reference, steps=STEPS, callback=lambda i: out.append(i.latent),
                **F32, **kwargs)
    return out


@pytest.fixture(scope="module")
def default_run(dit, texts):
    noise, reference = _edit()
    trace = RegionETrace()
    _regione(dit, noise, reference, *texts, trace)
    return trace


def test_cond_and_uncond_are_separate_passes_with_their_own_text_and_cache(default_run):
    row = default_run.rows[0]
    edited = row.partition.edited.numel()
    assert 0 < edited < N and "region" in row.kinds and "cached" in row.kinds
    for step in row.steps:
        if step.kind == "cached":
            assert step.kv is None
        elif step.kind in ("partition", "refresh"):
            assert [kv["cache_rows"] for kv in step.kv] == [(2 * N, COND + 2 * N), (2 * N, UNCOND + 2 * N)]
        elif step.kind == "region":
            assert [kv["rows_recomputed"] for kv in step.kv] == [(edited, COND + edited), (edited, UNCOND + edited)]
        else:
            assert [kv["mode"] for kv in step.kv] == ["full_no_cache"] * 2


def test_work_is_counted_per_side_with_its_own_text_length(default_run):
    row = default_run.rows[0]
    edited = row.partition.edited.numel()
    full = sum(k in ("full", "partition", "refresh") for k in row.kinds)
    assert default_run.plain_token_evals == STEPS * ((COND + 2 * N) + (UNCOND + 2 * N))
    assert default_run.token_evals == full * ((COND + 2 * N) + (UNCOND + 2 * N)) + \
        row.kinds.count("region") * ((COND + edited) + (UNCOND + edited))


@pytest.mark.parametrize("rules", [V12, V12.with_official_renorm()], ids=["v12", "official-renorm"])
def test_steps_before_the_partition_are_the_plain_samplers_under_the_same_rules(dit, texts, rules):
    noise, reference = _edit()
    mine = _latents(regione_denoise, dit, noise, reference, *texts, rules=rules)
    plain = _latents(denoise, dit, noise, reference, *texts, rules=rules)
    partition = plan_steps(RegionEConfig(), STEPS).partition
    for i in range(partition):
        assert torch.equal(mine[i], plain[i]), i
    assert not torch.equal(mine[-1], plain[-1])


def test_the_official_renorm_option_changes_the_run(dit, texts):
    noise, reference = _edit()
    default = _regione(dit, noise, reference, *texts)
    assert not torch.equal(default, _regione(dit, noise, reference, *texts, rules=V12.with_official_renorm()))


def test_other_step_counts_read_the_v12_table_as_a_rate_over_the_v12_schedule(dit, texts):
    noise, reference = _edit()
    trace = RegionETrace()
    _regione(dit, noise, reference, *texts, trace, steps=20)
    row = trace.rows[0]
    assert row.plan == plan_steps(RegionEConfig(), 20)
    ratios = DecayRatios(decay_table("v1.2"), torch.tensor(V12.schedule(20, N)), torch.tensor(V12.schedule(28, N)))
    decided = [s.decision for s in row.steps if s.decision.ratio is not None]
    assert decided and all(d.ratio == float(ratios(d.step)[0]) for d in decided)
    assert row.kinds[3] == "partition" and row.kinds[10] == "refresh" and row.kinds[19] == "full"


def test_a_batch_with_prompts_of_different_lengths_gives_each_row_as_alone(dit, texts):
    cond, uncond = texts
    short = _cut(cond, 30)
    a, ref_a = _edit()
    b, ref_b = _edit(seed=1, rect=(6, 10, 1, 6))
    trace = RegionETrace()
    both = _regione(dit, torch.cat([a, b]), torch.cat([ref_a, ref_b]), [cond, short], uncond, trace)
    assert torch.equal(both[:1], _regione(dit, a, ref_a, cond, uncond))
    assert torch.equal(both[1:], _regione(dit, b, ref_b, short, uncond))
    first, second = trace.rows
    assert not torch.equal(first.partition.edited, second.partition.edited)
    fills = [next(s.kv for s in row.steps if s.kind == "partition") for row in trace.rows]
    assert [kv["cache_rows"][1] for kv in fills[0]] == [COND + 2 * N, UNCOND + 2 * N]
    assert [kv["cache_rows"][1] for kv in fills[1]] == [30 + 2 * N, UNCOND + 2 * N]


def test_without_cfg_one_pass_runs_per_step(dit, texts):
    noise, reference = _edit()
    trace = RegionETrace()
    out = _regione(dit, noise, reference, texts[0], None, trace)
    assert all(len(s.kv) == 1 for s in trace.rows[0].steps if s.kv is not None)
    assert trace.plain_token_evals == STEPS * (COND + 2 * N) and torch.isfinite(out).all()


def test_batched_cfg_rules_refuse_a_v12_conditioning(dit, texts):
    noise, reference = _edit()
    with pytest.raises(ValueError, match="needs rules with separate calls"):
        _regione(dit, noise, reference, *texts, rules=DIFFUSERS_V11)


def test_the_v12_edit_takes_regione(dit, v12_models, recorded, texts):
    """Threshold 1 marks every token edited: region steps still leave the reference tokens out."""
    vae = load_vae(v12_models)
    image = Image.fromarray(recorded["in.image_uint8"].numpy())
    fed = []
    hook = dit.double_blocks[0].img_attn.qkv.register_forward_hook(lambda m, a, o: fed.append(a[0].shape[1]))
    try:
        plain = v12.edit(dit, vae, image, *texts, v12.V12Options(steps=10, size_level=64), dtype=torch.float32)
        plain_tokens, fed[:] = sum(fed), []
        fast = v12.edit(dit, vae, image, *texts, v12.V12Options(steps=10, size_level=64,
                                                                 regione=RegionEConfig(threshold=1.0)),
                        dtype=torch.float32)
    finally:
        hook.remove()
    assert plain_tokens == 10 * 2 * (2 * 16) and sum(fed) < plain_tokens
    assert fast.size == plain.size == image.size
