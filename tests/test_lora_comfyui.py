"""The LoRA loader inside the real ComfyUI: its model patcher gets the LoRA as weight patches that
ComfyUI's model management applies when the LoRA model loads and takes off when the base model loads
(in 32-bit and fp8 storage), and the node runs in the API workflow through POST /prompt.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout) and optionally ``COMFYUI_PYTHON`` (its interpreter), as
``test_comfyui_server.py`` does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfy_server import (
    DIT_WITH_A_LORA,
    api_prompt,
    prepare_base,
    require_comfyui,
    run_script,
    saved_image,
    saved_tensors,
    serve,
    with_lora,
)
from node_support import lib, tokenizer_for_tests, write_tiny_models

require_comfyui("to test the LoRA loader inside the real ComfyUI")

LAYER = "double_blocks.0.img_attn.qkv"
RANK, ALPHA, STRENGTH = 4, 2.0, 0.5

SCRIPT = DIT_WITH_A_LORA + r"""
read = lambda: base.model.state_dict()[config["key"]].detach().float().clone()
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
    config = {"diffusion_models": str(root / "models" / "diffusion_models"), "loras": str(root / "loras"), "dit": dit,
              "lora": "tiny_lora.safetensors", "weight_dtype": weight_dtype, "strength": STRENGTH,
              "key": LAYER + ".weight", "out": str(root / f"weights_{weight_dtype}.safetensors")}
    run_script(SCRIPT, config)
    weights, metadata = saved_tensors(config["out"])
    return weights, metadata["stored"]


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
    base = tmp_path_factory.mktemp("comfyui_lora_base")
    prepare_base(base)
    (base / "models" / "loras").mkdir()
    (base / "models" / "loras" / "tiny_lora.safetensors").write_bytes(
        (files[0] / "loras" / "tiny_lora.safetensors").read_bytes())
    with serve(base) as srv:
        yield srv


def _with_lora(strength: float, seed: int) -> dict:
    return with_lora(api_prompt(**{"7__seed": seed}), "tiny_lora.safetensors", strength)


def test_the_lora_loader_changes_the_api_workflow_result_and_the_base_model_comes_back(server):
    info = server.get("/object_info/Step1XEditLoraLoader")["Step1XEditLoraLoader"]
    assert info["input"]["required"]["lora_name"][0] == ["tiny_lora.safetensors"]
    before_any_lora = saved_image(server, server.run(_with_lora(0.0, seed=4)))
    plain = saved_image(server, server.run(api_prompt(**{"7__seed": 3})))
    with_lora = saved_image(server, server.run(_with_lora(1.0, seed=3)))
    after_the_lora = saved_image(server, server.run(api_prompt(**{"7__seed": 4})))
    assert (with_lora != plain).any()
    assert (after_the_lora == before_any_lora).all()
