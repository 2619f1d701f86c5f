"""TeaCache: opt-in skipping of the transformer blocks on steps whose input barely changed."""

import numpy as np
import pytest
import torch

from step1x.sampling.denoise import denoise, make_noise
from step1x.sampling.teacache import STEP1X_COEFFICIENTS, TeaCache, _polyval


def _sample(model, text, steps=6, **kw):
    cond, uncond = text
    with torch.no_grad():
        return denoise(model, make_noise((1, 16, 8, 8), 0), cond, uncond, reference=make_noise((1, 16, 8, 8), 1),
                       steps=steps, compute_dtype=torch.float32, **kw)


def _count_block_runs(model):
    calls = []
    handle = model.double_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_rescale_polynomial_is_evaluated_like_the_official_numpy_poly1d():
    for x in (0.0, 0.05, 0.3):
        assert _polyval(STEP1X_COEFFICIENTS, x) == pytest.approx(np.poly1d(STEP1X_COEFFICIENTS)(x), rel=1e-12)


def test_off_by_default_and_a_tiny_threshold_changes_nothing(tiny_dit, tiny_text):
    torch.testing.assert_close(_sample(tiny_dit, tiny_text, teacache=1e-12), _sample(tiny_dit, tiny_text),
                               atol=0, rtol=0)


def test_a_huge_threshold_computes_only_the_first_and_last_steps(tiny_dit, tiny_text):
    calls, handle = _count_block_runs(tiny_dit)
    try:
        out = _sample(tiny_dit, tiny_text, steps=6, teacache=1e9)
    finally:
        handle.remove()
    assert len(calls) == 2 and torch.isfinite(out).all()


def test_sequential_cfg_keeps_one_cache_per_half(tiny_dit, tiny_text):
    calls, handle = _count_block_runs(tiny_dit)
    try:
        _sample(tiny_dit, tiny_text, steps=5, teacache=1e9, sequential_cfg=True)
    finally:
        handle.remove()
    assert len(calls) == 4


def test_a_skipped_step_adds_the_last_residual():
    cache = TeaCache(threshold=1e9, total_steps=3)
    x0 = torch.ones(1, 4, 8)
    assert cache.should_compute(x0)
    cache.remember(x0, x0 * 3)
    assert not cache.should_compute(x0 * 1.01)
    torch.testing.assert_close(cache.reuse(torch.zeros(1, 4, 8)), torch.full((1, 4, 8), 2.0), atol=0, rtol=0)
    assert cache.should_compute(x0 * 1.02)  # the last step is always computed
    assert cache.skipped == [1]


def test_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        TeaCache(threshold=-1, total_steps=4)
