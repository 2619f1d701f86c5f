"""Attention backends: one entry point, registry selection with install hints, layout and fallback."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from step1x.models import attention as attn
from step1x.models.attention import AttentionBackendError, attention, resolve, select_backend


@pytest.fixture(autouse=True)
def _fresh_probes():
    """Package imports and GPU capabilities are probed once and cached; each test starts without them."""
    attn._import_error.cache_clear()
    attn._capability.cache_clear()
    yield
    attn._import_error.cache_clear()
    attn._capability.cache_clear()


def _gpu(monkeypatch, capability):
    monkeypatch.setattr(attn, "_capability", lambda index: capability)


def _packages(monkeypatch, **state):
    """Stand-in import probe: ``state`` maps a package to None (imports), "" (absent) or an import error."""
    monkeypatch.setattr(attn, "_import_error", lambda package: state.get(package, ""))


def _qkv(b=2, length=10, heads=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, length, heads, dim, generator=g) for _ in range(3)]


def test_sdpa_matches_reference_softmax_attention():
    q, k, v = _qkv()
    weights = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / 8**0.5, dim=-1)
    expected = torch.einsum("bhlm,bmhd->blhd", weights, v).reshape(2, 10, -1)
    torch.testing.assert_close(attention(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_boolean_mask_blocks_keys():
    q, k, v = _qkv(b=1, length=4)
    mask = torch.tensor([True, True, False, False]).view(1, 1, 1, 4)
    out = attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, attention(q, k[:, :2], v[:, :2]), atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'fast'.*sdpa"):
        select_backend("fast")


def test_uninstalled_backend_fails_at_selection_with_install_hint(monkeypatch):
    monkeypatch.setattr(attn.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AttentionBackendError, match="needs the package 'flash_attn', which is not installed.*"
                                                    "pip install flash-attn"):
        select_backend("flash")


def test_a_backend_whose_import_fails_is_refused_with_the_cause(monkeypatch):
    def broken(name):
        raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c10")

    monkeypatch.setattr(attn.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(attn.importlib, "import_module", broken)
    with pytest.raises(AttentionBackendError, match=r"importing 'flash_attn' failed \(ImportError: .*undefined symbol"):
        select_backend("flash")


def test_the_import_probe_runs_once_per_package(monkeypatch):
    calls = []
    monkeypatch.setattr(attn.importlib.util, "find_spec", lambda name: calls.append(name))
    for _ in range(3):
        assert not attn._BACKENDS["xformers"].is_installed()
    assert calls == ["xformers"]


def test_auto_and_sdpa_are_always_selectable():
    assert select_backend("auto") == "auto"
    assert select_backend("sdpa") == "sdpa"


def test_auto_on_cpu_resolves_to_sdpa():
    assert resolve("auto", torch.device("cpu"), torch.float32).name == "sdpa"


def test_xformers_on_cpu_tensors_falls_back_to_sdpa():
    assert resolve("xformers", torch.device("cpu"), torch.bfloat16).name == "sdpa"
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, backend="xformers"), attention(q, k, v), atol=0, rtol=0)


def test_flash_in_float32_falls_back_to_sdpa():
    assert resolve("flash", torch.device("cuda"), torch.float32).name == "sdpa"


def test_auto_prefers_flash_then_xformers_on_an_ampere_gpu(monkeypatch):
    _gpu(monkeypatch, (8, 0))
    _packages(monkeypatch, flash_attn=None, xformers=None)
    assert resolve("auto", torch.device("cuda"), torch.bfloat16).name == "flash"
    _packages(monkeypatch, xformers=None)
    assert resolve("auto", torch.device("cuda"), torch.bfloat16).name == "xformers"


def test_auto_skips_a_backend_whose_import_fails(monkeypatch):
    _gpu(monkeypatch, (9, 0))
    _packages(monkeypatch, flash_attn="ImportError: undefined symbol", xformers=None)
    assert resolve("auto", torch.device("cuda:0"), torch.float16).name == "xformers"
    assert attn.installed_backends() == ["sdpa", "xformers"]


def test_before_ampere_auto_keeps_flash_out_and_xformers_out_of_bf16(monkeypatch):
    _gpu(monkeypatch, (7, 5))
    _packages(monkeypatch, flash_attn=None, xformers=None)
    assert resolve("auto", torch.device("cuda"), torch.float16).name == "xformers"
    assert resolve("auto", torch.device("cuda"), torch.bfloat16).name == "sdpa"


def test_flash_chosen_on_a_gpu_before_ampere_falls_back_to_sdpa_with_the_reason(monkeypatch, caplog):
    _gpu(monkeypatch, (7, 5))
    monkeypatch.setattr(attn, "_warned", set())
    with caplog.at_level("WARNING", logger="step1x.models.attention"):
        assert resolve("flash", torch.device("cuda"), torch.float16).name == "sdpa"
    assert "compute capability 7.5 (it needs 8.0 or newer)" in caplog.text


def test_xformers_receives_bmhk_layout_and_an_aligned_bias(monkeypatch):
    """The xformers kernel cannot run on CPU; a stand-in module records what it is given."""
    seen = {}

    def fake_mea(q, k, v, attn_bias=None):
        seen.update(q=q, k=k, v=v, bias=attn_bias)
        scores = torch.einsum("bmhk,bnhk->bhmn", q, k) / q.shape[-1] ** 0.5
        if attn_bias is not None:
            scores = scores + attn_bias
        return torch.einsum("bhmn,bnhk->bmhk", scores.softmax(-1), v)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = fake_mea
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    q, k, v = _qkv(b=2, length=5, heads=3, dim=8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]]).view(2, 1, 1, 5).expand(2, 1, 5, 5)
    out = attn._BACKENDS["xformers"].fn(q, k, v, mask)
    assert seen["q"].shape == (2, 5, 3, 8)
    assert seen["bias"].shape == (2, 3, 5, 5) and seen["bias"].stride(-2) % 8 == 0
    assert seen["bias"].dtype == q.dtype
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_backend_names_list_auto_first():
    names = attn.backend_names()
    assert names[0] == "auto" and {"sdpa", "xformers", "flash"} <= set(names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers and flash kernels need a CUDA GPU")
@pytest.mark.parametrize("backend", ["xformers", "flash"])
def test_gpu_backends_match_sdpa(backend):
    pytest.importorskip({"xformers": "xformers", "flash": "flash_attn"}[backend])
    q, k, v = (t.cuda().bfloat16() for t in _qkv(b=2, length=300, heads=4, dim=64))
    torch.testing.assert_close(attention(q, k, v, backend=backend), attention(q, k, v), atol=1e-2, rtol=1e-2)
