"""Inside the real ComfyUI, the speed settings work on the layers ComfyUI's casting ops build: a block Linear of
ComfyUI's class with an fp8 weight multiplies in fp8 (the product of its quantised operands up to bf16 rounding,
under autocast as the sampler runs it), one whose weight has a low-VRAM patch keeps ComfyUI's own cast, and a DiT
block built from ComfyUI's ops compiles and gives the eager numbers. The native Model Loader takes both widgets
as ComfyUI's executor passes them and applies them to the DiT inside the MODEL it returns.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout) and optionally ``COMFYUI_PYTHON`` (its interpreter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from comfy_server import run_script
from node_support import ROOT, tokenizer_for_tests, write_tiny_models

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


NATIVE_LOADER = r"""
import folder_paths
from node_support import load_pack, run_node

pack = load_pack()
folder_paths.add_model_folder_path("diffusion_models", config["diffusion_models"])
lib = lambda name: importlib.import_module("step1x_edit_pack.step1x." + name)
fp8, compiled = lib("models.fp8_matmul"), lib("models.compile")
result = {}
for name, widgets in config["cases"].items():
    model = run_node(pack, "Step1XEditModelLoader", unet_name=config["dit"], attention="sdpa", **widgets)[0]
    dit = model.model.diffusion_model
    result[name] = {"model": type(model.model).__name__, "fp8_matmul": fp8.uses_fp8_matmul(dit),
                    "compiled": compiled.is_compiled(dit)}
print(json.dumps(result))
"""

NATIVE_CASES = {"fp8_matmul": {"weight_dtype": "fp8_e4m3fn", "fp8_matmul": True, "compile": False},
                "compile": {"weight_dtype": "default", "fp8_matmul": False, "compile": True},
                "neither": {"weight_dtype": "default"}}


@pytest.fixture(scope="module")
def native_loader(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_speed_native")
    names = write_tiny_models(root / "models", tokenizer_for_tests(root / "tokenizer"))
    out = run_script(NATIVE_LOADER, {"diffusion_models": str(root / "models" / "diffusion_models"),
                                     "dit": names["dit"], "cases": NATIVE_CASES})
    return json.loads(out.strip().splitlines()[-1])


def test_the_native_model_loader_applies_fp8_matmul_and_compile_to_the_models_dit(native_loader):
    assert {name: case["model"] for name, case in native_loader.items()} == dict.fromkeys(NATIVE_CASES,
                                                                                        "Step1XEditModel")
    assert native_loader["fp8_matmul"]["fp8_matmul"] and not native_loader["fp8_matmul"]["compiled"]
    assert native_loader["compile"]["compiled"] and not native_loader["compile"]["fp8_matmul"]
    assert not (native_loader["neither"]["fp8_matmul"] or native_loader["neither"]["compiled"])
