"""The default layer operations: weights stored in another dtype are cast to the dtype the layer computes in."""

import contextlib

import pytest
import torch

from step1x.models.ops import CastLinear, compute_dtype

FP8 = torch.float8_e4m3fn


def test_without_autocast_a_layer_computes_in_the_input_dtype():
    assert compute_dtype(torch.zeros(2, dtype=torch.float32)) == torch.float32
    assert compute_dtype(torch.zeros(2, dtype=torch.bfloat16)) == torch.bfloat16


def test_under_autocast_a_layer_computes_in_the_autocast_dtype():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(torch.zeros(2, dtype=torch.float32)) == torch.bfloat16


@pytest.mark.filterwarnings("ignore:torch.get_autocast_cpu_dtype:DeprecationWarning")  # only new torch warns
def test_torch_before_2_4_reads_the_cpu_autocast_dtype_too(monkeypatch):
    """torch 2.1-2.3 have only the argument-less ``is_autocast_enabled`` (CUDA) and the per-device getters."""
    real = torch.is_autocast_enabled

    def without_device_argument(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments but 1 was given")
        return real("cuda")

    @contextlib.contextmanager
    def old_torch():
        with monkeypatch.context() as m:
            m.setattr(torch, "is_autocast_enabled", without_device_argument)
            m.delattr(torch, "get_autocast_dtype")
            m.setattr(torch, "is_autocast_cpu_enabled", lambda: real("cpu"))
            yield

    x = torch.zeros(2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # entering autocast uses the new API itself
        with old_torch():
            assert compute_dtype(x) == torch.bfloat16
    with old_torch():
        assert compute_dtype(x) == torch.float32


@pytest.mark.parametrize("stored", [torch.bfloat16, FP8])
def test_a_linear_stored_in_low_precision_equals_one_holding_the_upcast_weight(stored):
    g = torch.Generator().manual_seed(0)
    layer = CastLinear(8, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 8, generator=g))
        layer.bias.copy_(torch.randn(4, generator=g))
    layer.weight.data = layer.weight.data.to(stored)
    x = torch.randn(3, 8, generator=g)
    expected = torch.nn.functional.linear(x, layer.weight.float(), layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    assert layer.weight.dtype == stored
