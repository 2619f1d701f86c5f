"""fp8 matmul: block Linear layers with float8_e4m3fn weights multiply by torch._scaled_mm with a per-token scale.

Bounds (measured on the tiny model, 6 steps, seeded): fp8 matmul vs the fp8 upcast path 0.0041 relative (fp32
compute) and 0.011 (bf16 compute); fp8 matmul vs the fp32 weights 0.0046. The asserts allow about 2x that."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from step1x.checkpoints.gguf_convert import encode
from step1x.checkpoints.loading import cast_model
from step1x.models import fp8_matmul
from step1x.models.configs import TINY_DIT, with_version
from step1x.models.fp8_matmul import (
    E4M3,
    Fp8MatmulError,
    check_device,
    disable_fp8_matmul,
    enable_fp8_matmul,
    fp8_linear,
    quantize_rows,
    quantize_weight_rows,
    uses_fp8_matmul,
)
from step1x.models.model import Step1XEdit
from step1x.models.ops import CastLinear
from step1x.models.quantized import QuantizedOps, set_quantized
from step1x.sampling.denoise import denoise, make_noise


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _tiny(dtype=torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Step1XEdit(with_version(TINY_DIT, "v1.1"), dtype=torch.float32).eval().requires_grad_(False).to(dtype)


def _sample(model, text, dtype):
    with torch.no_grad():
        return denoise(model, make_noise((1, 16, 8, 8), 0), *text, reference=make_noise((1, 16, 8, 8), 1), steps=6,
                       compute_dtype=dtype)


def _fp8_linear_layer(n_in=64, n_out=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = CastLinear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=g) * 0.05)
        layer.bias.copy_(torch.randn(n_out, generator=g))
    layer.weight.data = layer.weight.data.to(E4M3)
    return layer.requires_grad_(False)


# ----------------------------------------------------------------------------------------------- one layer


def test_rows_are_scaled_to_the_e4m3_range():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [896.0, 1.0, -3.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == E4M3 and scale.shape == (3, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale.squeeze(1), torch.tensor([2.0 / 448, 1.0, 2.0]))
    assert q.float().abs().amax(dim=1).tolist() == [448.0, 0.0, 448.0]


def test_the_product_equals_that_of_its_quantised_operands_then_the_bias():
    layer = _fp8_linear_layer()
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_rows(x.reshape(-1, 64))
    expected = (q.float() * scale) @ layer.weight.float().t()
    expected = expected.to(torch.bfloat16).float().reshape(2, 7, 48) + layer.bias
    out = fp8_linear(x, layer.weight, layer.bias, None, torch.float32)
    assert out.shape == (2, 7, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_tensor_wise_the_input_takes_one_scale_and_the_weight_rows_theirs_after():
    layer = _fp8_linear_layer()
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    weight_scale = torch.linspace(0.5, 2.0, 48)
    q, scale = quantize_rows(x.reshape(1, -1))
    assert scale.shape == (1, 1)
    expected = (q.reshape(14, 64).float() * scale) @ layer.weight.float().t() * weight_scale + layer.bias
    out = fp8_linear(x, layer.weight, layer.bias, weight_scale, torch.float32, rowwise=False)
    torch.testing.assert_close(out, expected.reshape(2, 7, 48), atol=1e-5, rtol=1e-5)


def test_row_wise_scales_on_the_cpu_and_hopper_one_input_scale_on_ada(monkeypatch):
    assert fp8_matmul.rowwise_on(torch.device("cpu"))
    monkeypatch.setattr(fp8_matmul, "_capability", lambda index: (8, 9))
    assert not fp8_matmul.rowwise_on(torch.device("cuda", 0))
    monkeypatch.setattr(fp8_matmul, "_capability", lambda index: (9, 0))
    assert fp8_matmul.rowwise_on(torch.device("cuda", 0))


def test_per_row_weight_scales_keep_small_rows_precise():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 64, generator=g) * torch.logspace(-4, 0, 32)[:, None]
    x = torch.randn(64, 64, generator=g)
    exact = x @ weight.t()
    q, scale = quantize_weight_rows(weight)
    assert scale.shape == (32,)
    scaled = fp8_linear(x, q, None, scale, torch.float32)
    plain = fp8_linear(x, weight.to(E4M3), None, None, torch.float32)
    row_error = lambda y: ((y - exact).norm(dim=0) / exact.norm(dim=0)).max().item()  # noqa: E731
    assert row_error(scaled) < 0.07  # measured 0.045: activation and weight each rounded to 3 mantissa bits
    assert row_error(plain) > 0.5  # measured 1.04: the 1e-4 rows fall below e4m3's smallest subnormal


def test_no_full_precision_copy_of_the_weight_is_made():
    layer = _fp8_linear_layer(n_in=64, n_out=48)
    x = torch.randn(3, 64)

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.made += [(tuple(t.shape), t.dtype) for t in (out if isinstance(out, tuple) else (out,))
                          if isinstance(t, torch.Tensor)]
            return out

    def weight_copies(module):
        with Shapes() as mode:
            module(x)
        return [dtype for shape, dtype in mode.made if shape in ((48, 64), (64, 48)) and dtype != E4M3]

    assert torch.float32 in weight_copies(layer)  # the upcast path makes one: the test can see it
    layer.__class__ = fp8_matmul._fp8_class(CastLinear)
    assert weight_copies(layer) == []


# ----------------------------------------------------------------------------------------------- the model


def test_the_block_linears_of_an_fp8_model_are_switched_and_can_be_switched_back():
    model = cast_model(_tiny(), torch.float32, "fp8_e4m3fn")
    assert enable_fp8_matmul(model) == 26  # 2 double blocks x 2 streams x 5 + 2 single blocks x 3
    assert uses_fp8_matmul(model)
    assert not isinstance(model.final_layer.linear, fp8_matmul.Fp8MatmulMixin)
    assert not isinstance(model.img_in, fp8_matmul.Fp8MatmulMixin)
    disable_fp8_matmul(model)
    assert not uses_fp8_matmul(model) and type(model.double_blocks[0].img_attn.qkv) is CastLinear


@pytest.mark.parametrize("dtype, vs_upcast, vs_full", [(torch.float32, 0.01, 0.01), (torch.bfloat16, 0.025, 0.025)])
def test_tiny_model_sampling_stays_close_to_the_upcast_and_full_precision_paths(tiny_text, dtype, vs_upcast, vs_full):
    full = _tiny(dtype)
    upcast = cast_model(copy.deepcopy(full), dtype, "fp8_e4m3fn")
    matmul = copy.deepcopy(upcast)
    enable_fp8_matmul(matmul)
    out = _sample(matmul, tiny_text, dtype)
    assert torch.isfinite(out).all()
    assert 0 < _rel(out, _sample(upcast, tiny_text, dtype)) < vs_upcast
    assert _rel(out, _sample(full, tiny_text, dtype)) < vs_full


def test_layers_whose_sizes_are_not_multiples_of_16_keep_the_upcast_path():
    model = cast_model(_tiny(), torch.float32, "fp8_e4m3fn")
    odd = model.double_blocks[0].img_attn.qkv
    odd.out_features = 200  # as a layer of 200 outputs would be; only the size is read
    enable_fp8_matmul(model)
    assert type(odd) is CastLinear and isinstance(model.double_blocks[0].img_attn.proj, fp8_matmul.Fp8MatmulMixin)


@pytest.mark.parametrize("weight_dtype, named", [("default", "float32"), ("bf16", "bfloat16"),
                                                 ("fp8_e5m2", "float8_e5m2")])
def test_refused_for_weights_that_are_not_e4m3(weight_dtype, named):
    model = cast_model(_tiny(), torch.float32, weight_dtype)
    with pytest.raises(Fp8MatmulError, match=f"fp8_matmul .*keeps them in {named}.*weight_dtype to fp8_e4m3fn"):
        enable_fp8_matmul(model)
    assert not uses_fp8_matmul(model)


def test_refused_for_gguf_quantised_weights():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Step1XEdit(with_version(TINY_DIT, "v1.1"), operations=QuantizedOps).eval().requires_grad_(False)
    linear = model.double_blocks[0].img_mlp[0]
    raw = torch.from_numpy(encode(linear.weight, "Q8_0"))
    set_quantized(linear, raw, "Q8_0", linear.weight.shape)
    with pytest.raises(Fp8MatmulError, match="fp8_matmul .*GGUF-quantised.*turn fp8_matmul off"):
        enable_fp8_matmul(model)


def test_a_layer_whose_weight_is_no_longer_fp8_takes_the_upcast_path():
    layer = _fp8_linear_layer()
    layer.__class__ = fp8_matmul._fp8_class(CastLinear)
    layer.weight.data = layer.weight.data.float()  # e.g. a LoRA merged into it
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)


def test_a_gpu_without_fp8_matmuls_is_refused_with_the_setting(monkeypatch):
    monkeypatch.setattr(fp8_matmul, "_capability", lambda index: (8, 6))
    with pytest.raises(Fp8MatmulError, match="compute capability 8.9.*8.6.*Turn fp8_matmul off"):
        check_device(torch.device("cuda", 0))
    monkeypatch.setattr(fp8_matmul, "_capability", lambda index: (9, 0))
    check_device(torch.device("cuda", 0))
    check_device(torch.device("cpu"))
