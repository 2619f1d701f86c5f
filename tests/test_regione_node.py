"""The RegionE node: a model the sampler runs with RegionE, the input model untouched."""

import importlib

import pytest
import torch
from safetensors.torch import load_file

from node_support import PACK_NAME, bind, fake_embeds, lib, run_node, sample

REFERENCE = {"samples": torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(7))}
DEFAULTS = dict(threshold=0.88, cache_threshold=0.02, warmup_steps=-1, post_steps=-1, refresh_steps="auto",
                erosion_dilation=True, region="similarity")


def _regione(pack, dit, **settings):
    return run_node(pack, "Step1XEditRegionE", model=dit, **{**DEFAULTS, **settings})[0]


def _image_rows(dit, fn):
    """Image-stream tokens through the first double block's projections, and the result of ``fn``."""
    rows = []
    handle = dit.model.double_blocks[0].img_attn.qkv.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[1]))
    try:
        out = fn()
    finally:
        handle.remove()
    return sum(rows), out


def test_the_node_returns_a_new_model_and_leaves_its_input_alone(pack, dit):
    fast = _regione(pack, dit)
    assert fast is not dit and fast.model is dit.model and dit.regione is None
    c = fast.regione
    assert (c.threshold, c.cache_threshold, c.warmup_steps, c.post_steps, c.refresh_steps) == (0.88, 0.02, None, None,
                                                                                               None)


def test_explicit_steps_and_no_refresh(pack, dit):
    c = _regione(pack, dit, warmup_steps=4, post_steps=0, refresh_steps=" ", region="mask").regione
    assert (c.warmup_steps, c.post_steps, c.refresh_steps, c.region) == (4, 0, (), "mask")
    assert _regione(pack, dit, refresh_steps="12, 20").regione.refresh_steps == (12, 20)


def test_a_bad_refresh_list_is_refused(pack, dit):
    with pytest.raises(ValueError, match="comma list of step numbers"):
        _regione(pack, dit, refresh_steps="sixteen")


def test_the_sampler_feeds_fewer_tokens_with_a_regione_model(pack, dit):
    conditioning = bind(pack, dit, fake_embeds(pack, hidden=dit.model.params.connector.in_channels))
    fast = _regione(pack, dit)
    full, plain = _image_rows(dit, lambda: sample(pack, dit, conditioning, steps=12, reference_latent=REFERENCE))
    fewer, out = _image_rows(dit, lambda: sample(pack, fast, conditioning, steps=12, reference_latent=REFERENCE))
    assert full == 12 * 2 * 12 and fewer < 0.75 * full  # 12 steps, noise + reference tokens of a 3x4 grid
    assert torch.isfinite(out["samples"]).all() and not torch.equal(out["samples"], plain["samples"])


def test_regione_and_teacache_nodes_refuse_each_other(pack, dit):
    cached = run_node(pack, "Step1XEditTeaCache", model=dit, threshold=0.2)[0]
    with pytest.raises(ValueError, match="already has TeaCache"):
        _regione(pack, cached)
    with pytest.raises(ValueError, match="already has RegionE"):
        run_node(pack, "Step1XEditTeaCache", model=_regione(pack, dit), threshold=0.2)


def test_the_mask_region_without_a_mask_is_refused_by_the_sampler(pack, dit):
    conditioning = bind(pack, dit, fake_embeds(pack, hidden=dit.model.params.connector.in_channels))
    with pytest.raises(ValueError, match='region "mask" takes the edited region from a mask'):
        sample(pack, _regione(pack, dit, region="mask"), conditioning, reference_latent=REFERENCE)


def test_the_samplers_call_runs_regione_on_a_v12_dit(pack, bridge, v12_models, v12_dir):
    """The node's settings reach RegionE with a v1.2 DiT: the sampler's denoise call gives RegionE's result
    under the v1.2 rules (cond and uncond with their own lengths)."""
    load_dit, sampling = lib("checkpoints.loading").load_dit, lib("sampling.denoise")
    regione_denoise = lib("sampling.regione").regione_denoise
    sampler = importlib.import_module(f"{PACK_NAME}.nodes.sampler")
    model = load_dit(v12_models, compute_dtype=torch.float32, operations=bridge.operations())
    dit = importlib.import_module(f"{PACK_NAME}.nodes.sockets").DiT(
        bridge.manage(model, torch.device("cpu"), torch.device("cpu")), torch.float32, "v1.2 tiny")
    fast = _regione(pack, dit)
    recorded = load_file(v12_dir / "denoise_v12.safetensors")

    def side(name, n):
        get = lambda key: recorded[f"prompt.{name}.{key}"]  # noqa: E731
        return sampling.TextConditioning(get("embedding")[:, :n], get("mask")[:, :n], get("txt_ids")[:n],
                                         get("text_embeds")[:, :n], get("text_masks")[:, :n])

    cond, uncond = side("cond", 40), side("uncond", 25)
    noise = torch.randn(1, 16, 8, 10, generator=torch.Generator().manual_seed(3))
    reference = torch.randn(1, 16, 8, 10, generator=torch.Generator().manual_seed(4))
    kw = dict(reference=reference, init=None, keep=None, steps=10, cfg=6.0, renorm_threshold=0.93, strength=1.0)
    with torch.no_grad():
        expected = regione_denoise(model, noise, cond, uncond, reference=reference, steps=10,
                                   compute_dtype=torch.float32, device=torch.device("cpu"))
    out = sampler.run(fast, model.connector, noise, cond, uncond, **kw)
    assert torch.equal(out, lib("graph_io").latent_from_model_space(expected))
    assert not torch.equal(out, sampler.run(dit, model.connector, noise, cond, uncond, **kw))
