"""Inside the real ComfyUI, the pack's casting Linear asks ComfyUI's cast for the autocast dtype (bf16 weights
are never copied to float32 only for autocast to cast them back) and gives the same numbers as a plain Linear
under autocast, for bf16 and fp8 weights; with newer ComfyUI's offloadable cast it releases the cast through
``uncast_bias_weight`` as ComfyUI's own layers do. (ComfyUI 0.3.64 converts inside ``cast_to``; 0.33 moves the
weight with ``cast_to`` without a dtype and converts it afterwards: both are checked by what the layer asks for
and by the dtypes ``cast_to`` is asked for.)

Needs ``COMFYUI_PATH`` (a ComfyUI checkout) and optionally ``COMFYUI_PYTHON`` (its interpreter).
"""

from __future__ import annotations

import json

import pytest

from comfy_server import require_comfyui, run_script

require_comfyui("to test the casting layers inside the real ComfyUI")

SCRIPT = r"""
import comfy.model_management as mm
import torch
import torch.nn.functional as F
from node_support import load_pack

load_pack()
bridge = sys.modules["step1x_edit_pack.nodes._comfy"]
ops = bridge.operations()
requested, asked = [], []
original = mm.cast_to
mm.cast_to = lambda w, dtype=None, *a, **k: requested.append(dtype) or original(w, dtype, *a, **k)
original_cast = comfy.ops.cast_bias_weight
def asking_cast(s, *args, **kwargs):
    asked.append([str(kwargs.get("dtype")), str(kwargs.get("bias_dtype"))])
    return original_cast(s, *args, **kwargs)
comfy.ops.cast_bias_weight = asking_cast
g = torch.Generator().manual_seed(0)
x = torch.randn(3, 8, generator=g)
result = {}
for name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
    layer = ops.Linear(8, 4, dtype=dtype)
    layer.weight = torch.nn.Parameter((torch.randn(4, 8, generator=g) * 0.3).to(dtype), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(4, generator=g).to(torch.bfloat16), requires_grad=False)
    requested.clear()
    asked.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        want = F.linear(x, layer.weight.to(torch.bfloat16), layer.bias)
    result[name] = {"equal": bool(torch.equal(got, want)), "dtype": str(got.dtype),
                    "requested": sorted({str(d) for d in requested}), "asked": list(asked)}
comfy.ops.cast_bias_weight = original_cast
plain = ops.Linear(8, 4, dtype=torch.float32)
plain.weight = torch.nn.Parameter(torch.randn(4, 8, generator=g), requires_grad=False)
plain.bias = torch.nn.Parameter(torch.randn(4, generator=g), requires_grad=False)
result["fp32_no_autocast"] = bool(torch.equal(plain(x), F.linear(x, plain.weight, plain.bias)))

# Newer ComfyUI's cast: offloadable=True also returns a stream that uncast_bias_weight releases after use.
legacy_cast, calls = comfy.ops.cast_bias_weight, []
def offloadable_cast(s, input=None, dtype=None, device=None, bias_dtype=None, offloadable=False):
    calls.append(["cast", offloadable])
    weight, bias = legacy_cast(s, input, dtype=dtype, device=device, bias_dtype=bias_dtype)[:2]
    return (weight, bias, "stream") if offloadable else (weight, bias)
comfy.ops.cast_bias_weight = offloadable_cast
comfy.ops.uncast_bias_weight = lambda s, weight, bias, stream: calls.append(["uncast", stream])
bridge._AUTOCAST_OPS = None
layer = bridge.operations().Linear(8, 4, dtype=torch.bfloat16)
layer.weight = torch.nn.Parameter((torch.randn(4, 8, generator=g) * 0.3).to(torch.bfloat16), requires_grad=False)
layer.bias = None
with torch.autocast("cpu", dtype=torch.bfloat16):
    equal = bool(torch.equal(layer(x), F.linear(x, layer.weight)))
result["offloadable"] = {"equal": equal, "calls": calls}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def result():
    return json.loads(run_script(SCRIPT, {}).strip().splitlines()[-1])


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_under_autocast_the_layer_asks_comfyui_for_the_autocast_dtype(result, weights):
    assert result[weights]["asked"] == [["torch.bfloat16", "torch.bfloat16"]]


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_under_autocast_no_weight_is_copied_to_float32(result, weights):
    assert result[weights]["requested"], "the probe saw no cast_to call"
    assert set(result[weights]["requested"]) <= {"torch.bfloat16", "None"}, result[weights]["requested"]


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_under_autocast_the_output_equals_a_plain_linear(result, weights):
    assert result[weights]["equal"] and result[weights]["dtype"] == "torch.bfloat16"


def test_without_autocast_the_layer_is_comfyuis_own(result):
    assert result["fp32_no_autocast"]


def test_with_newer_comfyuis_offloadable_cast_the_layer_releases_the_cast_after_use(result):
    assert result["offloadable"]["equal"]
    assert result["offloadable"]["calls"] == [["cast", True], ["uncast", "stream"]]
