"""RegionE reproduces the reference run on the tiny v1.1 DiT (fp32, 28 steps, the reference defaults).

The reference ran on the diffusers v1.1 pipeline: RegionE samples under its rules (``DIFFUSERS_V11``: numpy
float32 sigmas, DiT time ``float32(sigma * 1000) / 1000``, renorm while the 0-1000 timestep exceeds 0.93, so
always; float32 Euler steps; one [cond; uncond] batch; reference ids ``(1, row + 1, col + 1)``). Decisions must
be identical; tensors agree within 1e-5, velocities within 2e-5: a velocity is ``uncond + 6 * (cond - uncond)
/ renorm``, which scales up the few 1e-6 by which the official and the diffusers DiT forwards differ on the same
weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import REGIONE_BLOCKS, REGIONE_BRANCHES, REGIONE_KINDS
from step1x.checkpoints.loading import load_dit
from step1x.sampling.denoise import TextConditioning, denoise, get_schedule, pack, unpack
from step1x.sampling.regione import RegionETrace, regione_denoise
from step1x.sampling.regione_rules import decay_table, timesteps_1000
from step1x.sampling.rules import DIFFUSERS_V11

ATOL = 1e-5
VELOCITY_ATOL = 2e-5


@pytest.fixture(scope="module")
def case(regione_dir, official_dir):
    io = load_file(regione_dir / "regione_main.safetensors")
    steps = json.loads((regione_dir / "regione_main_steps.json").read_text())
    model = load_dit(official_dir / "dit_v11_weights.safetensors", compute_dtype=torch.float32)
    cond = TextConditioning(io["in.prompt_embeds"], io["in.prompt_embeds_mask"])
    uncond = TextConditioning(io["in.negative_prompt_embeds"], io["in.negative_prompt_embeds_mask"])
    return io, steps, model, cond, uncond


def _sample(case, sampler, **kwargs):
    io, _, model, cond, uncond = case
    with torch.no_grad():
        return sampler(model, unpack(io["in.noise_packed"], 32, 32), cond, uncond, reference=io["in.ref_latent"],
                       compute_dtype=torch.float32, rules=DIFFUSERS_V11, **kwargs)


@pytest.fixture(scope="module")
def run(case):
    trace = RegionETrace(tensors=True, kv_steps=(5, 6))
    latent = _sample(case, regione_denoise, trace=trace)
    return latent, trace.rows[0], trace


def test_the_schedule_and_the_decision_times_are_the_references(regione_dir):
    io = load_file(regione_dir / "regione_main.safetensors")
    assert torch.equal(io["sched.sigmas"], io["plain.sigmas"])
    assert DIFFUSERS_V11.schedule(28, 256) == io["sched.sigmas"].tolist()
    assert (io["sched.sigmas"] - torch.tensor(get_schedule(28, 256))).abs().max() <= 6e-8  # one float32 rounding
    assert torch.equal(timesteps_1000(io["sched.sigmas"]), io["sched.timesteps"])
    assert all(DIFFUSERS_V11.renorm_active(s, 0.93) for s in io["sched.sigmas"][:-1].tolist())


def test_the_decay_tables_are_the_reference_tables(regione_dir):
    assert torch.equal(decay_table("v1.1"), load_file(regione_dir / "regione_main.safetensors")["gamma_fp16"])
    assert torch.equal(decay_table("v1.2"), load_file(regione_dir / "regione_v12.safetensors")["gamma_fp16"])


def test_step_kinds(case, run):
    _, steps, *_ = case
    assert run[1].kinds == [REGIONE_KINDS[k] for k in steps["step_kinds"]]


def test_partition_estimate_and_similarity(case, run):
    io, *_ = case
    row = run[1]
    torch.testing.assert_close(row.estimate, io["partition.onestep_x0"], atol=ATOL, rtol=0)
    torch.testing.assert_close(row.partition.similarity, io["partition.cosine_similarity"][0], atol=ATOL, rtol=0)


def test_partition_masks_before_and_after_erosion_dilation(case, run):
    io, *_ = case
    part = run[1].partition
    assert torch.equal(part.raw, io["partition.mask_raw_le_threshold"].bool())
    assert torch.equal(part.mask, io["partition.mask_after_erosion_dilation"].bool())


def test_edited_and_unedited_ids(case, run):
    io, *_ = case
    part = run[1].partition
    assert torch.equal(part.edited, io["partition.edited_ids"][0])
    assert torch.equal(part.unedited, io["partition.unedited_ids"][0])


def test_every_cache_decision_with_its_inputs(case, run):
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


def test_kv_cache_use_per_step(case, run):
    _, steps, *_ = case
    for mine, ref in zip(run[1].steps, steps["steps"], strict=True):
        if ref.get("dit_forward") is None:
            assert mine.kv is None and mine.token_evals == 0
            continue
        blocks = ref["dit_forward"]["kv_per_block"]
        (kv,) = mine.kv  # cond and uncond are one batch with one cache
        assert {b["mode"] for b in blocks} == {kv["mode"]}, mine.step
        if kv["mode"] != "full_no_cache":
            assert kv["cache_rows"] == (blocks[0]["cache_rows"], blocks[-1]["cache_rows"])
        if kv["mode"] == "partial_update":
            assert kv["rows_recomputed"] == (blocks[0]["rows_recomputed_k"], blocks[-1]["rows_recomputed_k"])


def test_kv_cache_contents_after_the_fill_and_the_first_update(case, run):
    io, *_ = case
    row = run[1]
    for (step, name), k in row.kv.items():
        key = f"kvcache.step{step:02d}.{REGIONE_BLOCKS[name]}.k_cond"
        torch.testing.assert_close(k, io[key], atol=ATOL, rtol=0)
    edited = row.partition.edited
    changed = {name: torch.nonzero((row.kv[(6, name)] != row.kv[(5, name)]).any(-1))[:, 0] for name in REGIONE_BLOCKS}
    assert torch.equal(changed["double_blocks.0"], edited)
    assert torch.equal(changed["single_blocks.0"], torch.cat([torch.arange(24), 24 + edited]))


def test_every_step_velocity_and_latent(case, run):
    io, *_ = case
    for step in run[1].steps:
        key = f"regione.step{step.step:02d}"
        torch.testing.assert_close(step.velocity, io[f"{key}.velocity"], atol=VELOCITY_ATOL, rtol=0)
        torch.testing.assert_close(step.latent_after, io[f"{key}.latent_after"], atol=ATOL, rtol=0)
        if step.kind == "region":
            assert torch.equal(step.img_ids, io[f"{key}.dit_img_ids"])


def test_frozen_unedited_tokens_after_each_jump(case, run):
    io, *_ = case
    assert sorted(run[1].frozen) == [5, 15]
    for step, frozen in run[1].frozen.items():
        key = f"regione.step{step:02d}.unedited_latent_frozen"
        if key in io:
            torch.testing.assert_close(frozen, io[key], atol=ATOL, rtol=0)


def test_final_latent(case, run):
    io, *_ = case
    torch.testing.assert_close(pack(run[0]), io["regione.final_latent"], atol=ATOL, rtol=0)


def test_work_count(case, run):
    _, steps, *_ = case
    trace = run[2]
    assert trace.token_evals == steps["work"]["regione"]["token_evals_incl_text"]
    assert trace.plain_token_evals == steps["work"]["plain"]["token_evals_incl_text"]
    for mine, ref in zip(run[1].steps, steps["steps"], strict=True):
        assert mine.token_evals == ref.get("token_evals_incl_text", 0), mine.step


def test_plain_path_matches_the_reference_plain_run(case):
    io, *_ = case
    latents = []
    final = _sample(case, denoise, callback=lambda info: latents.append(pack(info.latent)))
    for i, latent in enumerate(latents):
        torch.testing.assert_close(latent, io[f"plain.step{i:02d}.latent_after"], atol=ATOL, rtol=0)
    torch.testing.assert_close(pack(final), io["plain.final_latent"], atol=ATOL, rtol=0)
