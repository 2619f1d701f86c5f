"""RegionE on Step1X-Edit v1.2 reproduces the RegionE package's v1.2 run (``regione_v12``: the tiny v1.2 DiT,
fp32, 28 steps, the package defaults) under the v1.2 sampler rules, which the v1.2 DiT selects by itself.

cond (294 text tokens) and uncond (269) are separate batch-1 passes, each with its own K/V cache and text
positions (RE-V12-1, RE-V12-2); the decay table is the refitted one (RE-V12-7). Every decision is identical.
Tensors: the v1.2 DiT's forward differs from the reference's by up to 2.6e-5 on the same inputs (the reference's
float32 time embedding is 4e-6 off ours on the machine that made it, and the set scales ``proj_out`` by 4; see
``test_dit_v12_parity``), and the guided velocity ``uncond + 6 * (cond - uncond) / renorm`` scales that up: velocities
and the one-step estimate are compared at 1e-4 (measured 8e-5), latents at 5e-5 (measured 2.9e-5), the key caches
at 2e-5 (measured 1.4e-5), similarities at 1e-5 (measured 6e-7), as the plain v1.2 sampler's parity test does.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import REGIONE_BLOCKS, REGIONE_BRANCHES, REGIONE_KINDS
from step1x.checkpoints.loading import load_dit
from step1x.sampling.denoise import TextConditioning, denoise, pack, unpack
from step1x.sampling.regione import RegionETrace, regione_denoise
from step1x.sampling.regione_rules import DECAY_V12, decay_table
from step1x.sampling.rules import V12

ATOL = 1e-5
VELOCITY_ATOL = 1e-4
LATENT_ATOL = 5e-5
KV_ATOL = 2e-5
TAGS = ("cond", "uncond")


@pytest.fixture(scope="module")
def case(regione_dir, v12_models):
    io = load_file(regione_dir / "regione_v12.safetensors")
    steps = json.loads((regione_dir / "regione_v12_steps.json").read_text())
    model = load_dit(v12_models, compute_dtype=torch.float32)
    return io, steps, model, _side(io, "cond"), _side(io, "uncond")


def _side(io, tag: str) -> TextConditioning:
    get = lambda name: io[f"in.prompt.{tag}.{name}"]  # noqa: E731
    return TextConditioning(get("embedding"), get("mask"), get("txt_ids"), get("text_embeds"), get("text_masks"))


def _sample(case, sampler, **kwargs):
    io, _, model, cond, uncond = case
    with torch.no_grad():
        return sampler(model, unpack(io["in.noise_packed"], 32, 32), cond, uncond, reference=io["in.ref_latent"],
                       compute_dtype=torch.float32, **kwargs)


@pytest.fixture(scope="module")
def run(case):
    trace = RegionETrace(tensors=True, kv_steps=(5, 6))
    latent = _sample(case, regione_denoise, trace=trace)
    return latent, trace.rows[0], trace


def test_the_v12_dit_takes_the_v12_rules_schedule_and_table(case):
    io, steps, model, *_ = case
    assert model.params.version == "v1.2"
    assert V12.schedule(28, 256) == io["sched.sigmas"].tolist() == steps["sigmas"]
    assert torch.equal(decay_table("v1.2"), io["gamma_fp16"])
    assert DECAY_V12[:2] == (0.7936, 0.9807) and not torch.equal(decay_table("v1.2"), decay_table("v1.1"))


def test_step_kinds(case, run):
    _, steps, *_ = case
    assert run[1].kinds == [REGIONE_KINDS[k] for k in steps["step_kinds"]]


def test_partition_estimate_similarity_masks_and_ids(case, run):
    io, *_ = case
    part = run[1].partition
    torch.testing.assert_close(run[1].estimate, io["partition.onestep_x0"], atol=VELOCITY_ATOL, rtol=0)
    torch.testing.assert_close(part.similarity, io["partition.cosine_similarity"][0], atol=ATOL, rtol=0)
    assert torch.equal(part.raw, io["partition.mask_raw_le_threshold"].bool())
    assert torch.equal(part.mask, io["partition.mask_after_erosion_dilation"].bool())
    assert torch.equal(part.edited, io["partition.edited_ids"][0])
    assert torch.equal(part.unedited, io["partition.unedited_ids"][0])


def test_every_cache_decision_with_the_refitted_table(case, run):
    _, steps, *_ = case
    for mine, ref in zip(run[1].steps, steps["steps"], strict=True):
        d, r = mine.decision, ref["cache_decision"]
        assert r["branch"].startswith(REGIONE_BRANCHES[d.branch]), mine.step
        assert d.compute == (not r["should_cache"]), mine.step
        if r["ratio_computed"]:
            assert d.ratio == r["ratio"] and d.inputs == r["ratio_inputs"], mine.step
        if "error_checked" in r:
            assert d.accumulate == r["accumulate_before_check"] and d.error == r["error_checked"], mine.step
        if not d.compute:
            assert mine.cache_source == ref["cache_source_step"], mine.step
            assert mine.cache_gathered == ref["cache_source_gathered_to_edited"], mine.step


def test_cond_and_uncond_are_separate_passes_with_their_own_caches_and_text_lengths(case, run):
    _, steps, *_ = case
    for mine, ref in zip(run[1].steps, steps["steps"], strict=True):
        forward = ref.get("dit_forward")
        if forward is None:
            assert mine.kv is None and mine.token_evals == 0
            continue
        assert (forward["forwards"], forward["batch_each"], forward["tags"]) == (2, 1, list(TAGS))
        assert len(mine.kv) == 2, mine.step
        for tag, kv in zip(TAGS, mine.kv, strict=True):
            blocks = forward["kv_per_block"][tag]
            assert {b["mode"] for b in blocks} == {kv["mode"]}, (mine.step, tag)
            if kv["mode"] != "full_no_cache":
                assert kv["cache_rows"] == (blocks[0]["cache_rows"], blocks[-1]["cache_rows"]), (mine.step, tag)
            if kv["mode"] == "partial_update":
                assert kv["rows_recomputed"] == (blocks[0]["rows_recomputed_k"], blocks[-1]["rows_recomputed_k"])
    region = run[1].steps[6].kv
    assert [kv["rows_recomputed"] for kv in region] == [(100, 294 + 100), (100, 269 + 100)]


def test_cond_key_cache_after_the_fill_and_the_first_update(case, run):
    io, *_ = case
    row = run[1]
    for (step, name), k in row.kv.items():
        key = f"kvcache.step{step:02d}.{REGIONE_BLOCKS[name]}.k_cond"
        torch.testing.assert_close(k, io[key], atol=KV_ATOL, rtol=0)
    edited = row.partition.edited
    changed = {name: torch.nonzero((row.kv[(6, name)] != row.kv[(5, name)]).any(-1))[:, 0] for name in REGIONE_BLOCKS}
    assert torch.equal(changed["double_blocks.0"], edited)
    assert torch.equal(changed["single_blocks.0"], torch.cat([torch.arange(294), 294 + edited]))


def test_every_step_velocity_and_latent(case, run):
    io, *_ = case
    for step in run[1].steps:
        key = f"regione.step{step.step:02d}"
        torch.testing.assert_close(step.velocity, io[f"{key}.velocity"], atol=VELOCITY_ATOL, rtol=0)
        torch.testing.assert_close(step.latent_after, io[f"{key}.latent_after"], atol=LATENT_ATOL, rtol=0)
        if step.kind == "region":
            assert torch.equal(step.img_ids, io[f"{key}.dit_img_ids"])


def test_frozen_unedited_tokens_and_the_final_latent(case, run):
    io, *_ = case
    assert sorted(run[1].frozen) == [5, 15]
    for step, frozen in run[1].frozen.items():
        torch.testing.assert_close(frozen, io[f"regione.step{step:02d}.unedited_latent_frozen"], atol=LATENT_ATOL,
                                   rtol=0)
    torch.testing.assert_close(pack(run[0]), io["regione.final_latent"], atol=LATENT_ATOL, rtol=0)


def test_work_count(case, run):
    _, steps, *_ = case
    trace = run[2]
    assert (trace.token_evals, trace.plain_token_evals) == (21913, 44436)
    assert trace.token_evals == steps["work"]["regione"]["token_evals_incl_text"]
    assert trace.plain_token_evals == steps["work"]["plain"]["token_evals_incl_text"]
    for mine, ref in zip(run[1].steps, steps["steps"], strict=True):
        assert mine.token_evals == ref.get("token_evals_incl_text", 0), mine.step


def test_the_stabilisation_steps_are_the_plain_v12_samplers_bit_for_bit(case, run):
    io, *_ = case
    latents = []
    final = _sample(case, denoise, callback=lambda info: latents.append(pack(info.latent)))
    for i in range(5):
        assert torch.equal(run[1].steps[i].latent_after, latents[i]), i
    torch.testing.assert_close(pack(final), io["plain.final_latent"], atol=LATENT_ATOL, rtol=0)
