"""The TeaCache node: a model the sampler runs with TeaCache, the input model untouched."""

import torch

from node_support import bind, fake_embeds, run_node, sample

REFERENCE = {"samples": torch.zeros(1, 16, 6, 8)}


def _block_runs(dit, fn):
    calls = []
    handle = dit.model.double_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        out = fn()
    finally:
        handle.remove()
    return len(calls), out


def test_the_node_returns_a_new_model_and_leaves_its_input_alone(pack, dit):
    (cached,) = run_node(pack, "Step1XEditTeaCache", model=dit, threshold=0.3)
    assert cached is not dit and cached.teacache == 0.3 and dit.teacache == 0.0
    assert cached.model is dit.model


def test_the_sampler_skips_blocks_with_a_teacache_model(pack, dit):
    conditioning = bind(pack, dit, fake_embeds(pack, hidden=dit.model.params.connector.in_channels))
    (cached,) = run_node(pack, "Step1XEditTeaCache", model=dit, threshold=100.0)
    full, _ = _block_runs(dit, lambda: sample(pack, dit, conditioning, steps=5, reference_latent=REFERENCE))
    fast, out = _block_runs(dit, lambda: sample(pack, cached, conditioning, steps=5, reference_latent=REFERENCE))
    assert (full, fast) == (5, 2)
    assert torch.isfinite(out["samples"]).all()


def test_threshold_zero_gives_the_plain_result(pack, dit):
    conditioning = bind(pack, dit, fake_embeds(pack, hidden=dit.model.params.connector.in_channels))
    (off,) = run_node(pack, "Step1XEditTeaCache", model=dit, threshold=0.0)
    a = sample(pack, dit, conditioning, reference_latent=REFERENCE)["samples"]
    b = sample(pack, off, conditioning, reference_latent=REFERENCE)["samples"]
    assert torch.equal(a, b)
