"""The LoRA loader inside the real ComfyUI: its model patcher gets the LoRA as weight patches that
ComfyUI's model management applies when the LoRA model loads and takes off when the base model loads
(in 32-bit and fp8 storage), and the node runs in the API workflow through POST /prompt.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout) and optionally ``COMFYUI_PYTHON`` (its interpreter), as
``test_comfyui_server.py`` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from node_support import ROOT, lib, tokenizer_for_tests, write_tiny_models

COMFYUI = os.environ.get("COMFYUI_PATH")
if not COMFYUI:
    pytest.skip("COMFYUI_PATH is not set; point it at a ComfyUI checkout (and COMFYUI_PYTHON at its interpreter) "
                "to test the LoRA loader inside the real ComfyUI", allow_module_level=True)
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)

LAYER = "double_blocks.0.img_attn.qkv"
RANK, ALPHA, STRENGTH = 4, 2.0, 0.5

SCRIPT = r"""
import json, sys
config = json.loads(sys.argv[1])
sys.argv = ["main.py", "--cpu"]
sys.path[:0] = [config["comfyui"], config["tests"]]
import importlib
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management as mm
import folder_paths
import torch
from safetensors.torch import save_file
from node_support import load_pack, run_node

pack = load_pack()
assert sys.modules["step1x_edit_pack.nodes._comfy"].IN_COMFYUI
for kind in ("diffusion_models", "loras"):
    folder_paths.add_model_folder_path(kind, config[kind])
base = run_node(pack, "Step1XEditDiTLoader", unet_name=config["dit"], weight_dtype=config["weight_dtype"],
                attention="sdpa")[0]
lora = run_node(pack, "Step1XEditLoraLoader", model=base, lora_name=config["lora"], strength=config["strength"])[0]
read = lambda: base.model.state_dict()[config["key"]].detach().float().clone()
sampling = importlib.import_module("step1x_edit_pack.step1x.sampling.denoise")
g = torch.Generator().manual_seed(0)
text = sampling.TextConditioning(torch.randn(1, 8, base.model.params.connector.in_channels, generator=g),
                                 torch.ones(1, 8, dtype=torch.long))
noise, reference = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
edit = lambda model: sampling.denoise(model.model, noise, text, None, reference=reference, steps=2,
                                      compute_dtype=model.compute_dtype, device=torch.device("cpu"))
out = {"before": read()}
mm.load_models_gpu([base.patcher])
out["base_edit"] = edit(base)
mm.load_models_gpu([lora.patcher])
out["patched"], out["lora_edit"] = read(), edit(lora)
mm.load_models_gpu([base.patcher])
out["restored"] = read()
mm.unload_all_models()
lora.patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # every layer cast at call time
out["lowvram_stored"], out["lowvram_edit"] = read(), edit(lora)
lora.patcher.unpatch_model()
save_file(out, config["out"], metadata={"stored": str(base.model.state_dict()[config["key"]].dtype)})
"""


def write_lora(path: Path, out: int, inp: int) -> torch.Tensor:
    """A kohya LoRA on LAYER; returns the weight change it makes at STRENGTH."""
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(out, RANK, generator=g) * 0.3, torch.randn(RANK, inp, generator=g) * 0.3
    name = "lora_unet_" + LAYER.replace(".", "_")
    save_file({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(ALPHA)},
              str(path))
    return STRENGTH * (ALPHA / RANK) * (up @ down)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_lora")
    names = write_tiny_models(root / "models", tokenizer_for_tests(root / "tokenizer"))
    (root / "loras").mkdir()
    params = lib("checkpoints.loading").inspect_dit(root / "models" / "diffusion_models" / names["dit"]).params
    with torch.device("meta"):
        out, inp = lib("checkpoints.lora").linear_shapes(lib("models.model").Step1XEdit(params))[LAYER]
    delta = write_lora(root / "loras" / "tiny_lora.safetensors", out, inp)
    return root, names, delta


def run_in_comfyui(root: Path, dit: str, weight_dtype: str) -> tuple[dict, str]:
    config = {"comfyui": COMFYUI, "tests": str(ROOT / "tests"), "diffusion_models": str(root / "models" /
              "diffusion_models"), "loras": str(root / "loras"), "dit": dit, "lora": "tiny_lora.safetensors",
              "weight_dtype": weight_dtype, "strength": STRENGTH, "key": LAYER + ".weight",
              "out": str(root / f"weights_{weight_dtype}.safetensors")}
    result = subprocess.run([PYTHON, "-c", SCRIPT, json.dumps(config)], cwd=COMFYUI, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(config["out"], framework="pt") as f:
        stored = f.metadata()["stored"]
    return load_file(config["out"]), stored


@pytest.fixture(scope="module")
def in_comfyui(files):
    root, names, delta = files
    return {dtype: run_in_comfyui(root, names["dit"], dtype) for dtype in ("default", "fp8_e4m3fn")}


def test_comfyui_patches_the_lora_in_and_takes_it_off_again(files, in_comfyui):
    weights, stored = in_comfyui["default"]
    assert stored == "torch.float32"
    torch.testing.assert_close(weights["patched"], weights["before"] + files[2], rtol=0, atol=1e-6)
    assert torch.equal(weights["restored"], weights["before"])
    assert (weights["lora_edit"] - weights["base_edit"]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", ["default", "fp8_e4m3fn"])
def test_under_lowvram_comfyui_applies_the_lora_as_each_layer_is_cast(in_comfyui, dtype):
    weights, _ = in_comfyui[dtype]
    assert torch.equal(weights["lowvram_stored"], weights["before"]), "stored weights stay as they are"
    effect = (weights["lora_edit"] - weights["base_edit"]).abs().max()
    gap = (weights["lowvram_edit"] - weights["lora_edit"]).abs().max()
    assert effect > 1e-2
    # fp8: a fully loaded model rounds the patched weight back to fp8 (stochastically); lowvram does not
    assert gap <= (1e-6 if dtype == "default" else 0.2 * effect), (gap, effect)


def test_comfyui_patches_fp8_weights_and_restores_their_bits(files, in_comfyui):
    weights, stored = in_comfyui["fp8_e4m3fn"]
    assert stored == "torch.float8_e4m3fn"
    change = (weights["patched"] - weights["before"]).flatten()
    cosine = torch.nn.functional.cosine_similarity(change, files[2].flatten(), dim=0)
    assert cosine > 0.5, f"the fp8 weights moved along the LoRA delta by cosine {cosine:.2f}"
    assert torch.equal(weights["restored"], weights["before"])


# ---------------------------------------------------------------------------------------- API workflow


@pytest.fixture(scope="module")
def server(tmp_path_factory, files):
    import test_comfyui_server as real

    base = tmp_path_factory.mktemp("comfyui_lora_base")
    real._prepare_base(base)
    (base / "models" / "loras").mkdir()
    (base / "models" / "loras" / "tiny_lora.safetensors").write_bytes(
        (files[0] / "loras" / "tiny_lora.safetensors").read_bytes())
    with real.serve(base) as srv:
        yield srv


def _with_lora(real, strength: float, seed: int) -> dict:
    prompt = real._api_prompt(**{"7__seed": seed})
    prompt["20"] = {"class_type": "Step1XEditLoraLoader",
                    "inputs": {"model": ["1", 0], "lora_name": "tiny_lora.safetensors", "strength": strength}}
    prompt["7"]["inputs"]["model"] = ["20", 0]
    return prompt


def _pixels(server, entry):
    import numpy as np
    from PIL import Image

    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["10"]["images"][0]
    with Image.open(server.base / "output" / image["subfolder"] / image["filename"]) as saved:
        return np.asarray(saved.convert("RGB"))


def test_the_lora_loader_changes_the_api_workflow_result_and_the_base_model_comes_back(server):
    import test_comfyui_server as real

    info = server.get("/object_info/Step1XEditLoraLoader")["Step1XEditLoraLoader"]
    assert info["input"]["required"]["lora_name"][0] == ["tiny_lora.safetensors"]
    before_any_lora = _pixels(server, server.run(_with_lora(real, 0.0, seed=4)))
    plain = _pixels(server, server.run(real._api_prompt(**{"7__seed": 3})))
    with_lora = _pixels(server, server.run(_with_lora(real, 1.0, seed=3)))
    after_the_lora = _pixels(server, server.run(real._api_prompt(**{"7__seed": 4})))
    assert (with_lora != plain).any()
    assert (after_the_lora == before_any_lora).all()
