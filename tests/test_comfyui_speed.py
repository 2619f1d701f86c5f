"""Inside the real ComfyUI, the speed settings work on the layers ComfyUI's casting ops build: a block Linear of
ComfyUI's class with an fp8 weight multiplies in fp8 (the product of its quantised operands up to bf16 rounding,
under autocast as the sampler runs it), one whose weight has a low-VRAM patch keeps ComfyUI's own cast, and a DiT
block built from ComfyUI's ops compiles and gives the eager numbers.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout) and optionally ``COMFYUI_PYTHON`` (its interpreter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from node_support import ROOT

COMFYUI = os.environ.get("COMFYUI_PATH")
if not COMFYUI:
    pytest.skip("COMFYUI_PATH is not set; point it at a ComfyUI checkout (and COMFYUI_PYTHON at its interpreter) "
                "to test the speed settings inside the real ComfyUI", allow_module_level=True)
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)

SCRIPT = r"""
import json, sys
config = json.loads(sys.argv[1])
sys.argv = ["main.py", "--cpu"]
sys.path[:0] = [config["comfyui"], config["tests"]]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import torch.nn.functional as F
from node_support import load_pack

load_pack()
bridge = sys.modules["step1x_edit_pack.nodes._comfy"]
fp8 = sys.modules.get("step1x_edit_pack.step1x.models.fp8_matmul") or __import__(
    "step1x_edit_pack.step1x.models.fp8_matmul", fromlist=["x"])
compile_ = __import__("step1x_edit_pack.step1x.models.compile", fromlist=["x"])
layers = __import__("step1x_edit_pack.step1x.models.layers", fromlist=["x"])
ops = bridge.operations()
g = torch.Generator().manual_seed(0)
result = {}

layer = ops.Linear(64, 32, dtype=torch.float8_e4m3fn)
layer.weight = torch.nn.Parameter((torch.randn(32, 64, generator=g) * 0.1).to(torch.float8_e4m3fn),
                                  requires_grad=False)
layer.bias = torch.nn.Parameter(torch.randn(32, generator=g).to(torch.bfloat16), requires_grad=False)
base = type(layer)
layer.__class__ = fp8._fp8_class(base)
x = torch.randn(5, 64, generator=g)
with torch.autocast("cpu", dtype=torch.bfloat16):
    got = layer(x)
q, scale = fp8.quantize_rows(x)
want = (((q.float() * scale) @ layer.weight.float().t()).to(torch.bfloat16) + layer.bias).to(torch.bfloat16)
result["fp8_error"] = float((got.float() - want.float()).abs().max() / want.float().abs().max())
result["fp8_class"] = type(layer).__mro__[1].__name__
result["fp8_dtype"] = str(got.dtype)
layer.weight_function = [lambda w: w]
with torch.autocast("cpu", dtype=torch.bfloat16):
    patched = layer(x)
    plain = F.linear(x, layer.weight.to(torch.bfloat16), layer.bias)
result["patched_upcast"] = bool(torch.equal(patched, plain))

torch.manual_seed(0)
block = layers.SingleStreamBlock(64, 4, 4.0, dtype=torch.float32, operations=ops).eval().requires_grad_(False)
for p in block.parameters():
    torch.nn.init.normal_(p, std=0.05)
xs = torch.randn(1, 40, 64, generator=g)
vec = torch.randn(1, 64, generator=g)
ids = torch.zeros(1, 40, 3)
ids[0, :, 1] = torch.arange(40)
emb = __import__("step1x_edit_pack.step1x.models.embeddings", fromlist=["x"])
pe = emb.rope_table(ids, (4, 6, 6), 10000)
with torch.no_grad():
    eager = block(xs, vec, pe)
    block.compile(backend="eager")
    compiled = block(xs, vec, pe)
result["compiled_diff"] = float((compiled - eager).abs().max())
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def result():
    config = {"comfyui": COMFYUI, "tests": str(ROOT / "tests")}
    proc = subprocess.run([PYTHON, "-c", SCRIPT, json.dumps(config)], capture_output=True, text=True, cwd=COMFYUI,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_comfyui_linear_with_an_fp8_weight_multiplies_in_fp8(result):
    assert result["fp8_dtype"] == "torch.bfloat16" and result["fp8_class"] == "Fp8MatmulMixin"
    assert result["fp8_error"] <= 2**-7  # the emulated product, up to bf16 rounding (of the largest output)


def test_a_layer_with_a_low_vram_patch_keeps_comfyuis_cast(result):
    assert result["patched_upcast"]


def test_a_block_of_comfyui_layers_compiles_to_the_eager_numbers(result):
    assert result["compiled_diff"] <= 1e-5
