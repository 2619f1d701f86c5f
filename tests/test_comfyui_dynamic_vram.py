"""The pack under ComfyUI's dynamic VRAM (comfy-aimdo), which current ComfyUI turns on by default on NVIDIA:
ComfyUI's Linear is then built without weights until a state dict is loaded, and ``CoreModelPatcher`` is the
dynamic-VRAM patcher. With the mode forced on inside a real ComfyUI (``--cpu --enable-dynamic-vram`` cannot
start ComfyUI on a machine without a GPU), the loader nodes build the DiT from lazy layers (every Linear; the
VAE has none, and the MLLM is built from transformers' own layers), all three load completely and run, a LoRA
patches the DiT and comes off again, and every result equals the one with the mode off; a server with the mode
forced on runs the API workflow.

On CPU the dynamic patcher hands the models to a plain ModelPatcher (their load device is the CPU), so
streaming weights through the dynamic patcher itself is only exercised on an NVIDIA GPU.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout) and optionally ``COMFYUI_PYTHON`` (its interpreter); skips on a
ComfyUI without dynamic VRAM (0.3.x).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comfy_server import (
    COMFYUI,
    IMAGE_SIZE,
    MODEL_NAMES,
    api_prompt,
    prepare_base,
    require_comfyui,
    run_script,
    saved_image,
    saved_tensors,
    serve,
    with_lora,
)
from node_support import tokenizer_for_tests, write_tiny_models

require_comfyui("to test the pack under ComfyUI's dynamic VRAM")
if not (Path(COMFYUI) / "comfy" / "memory_management.py").is_file():
    pytest.skip(f"the ComfyUI at {COMFYUI} predates dynamic VRAM (comfy/memory_management.py)",
                allow_module_level=True)

SCRIPT = r"""
import comfy.memory_management
import comfy.model_patcher
import folder_paths
import torch
from safetensors.torch import save_file
from node_support import PACK_NAME, bind, image, load_pack, run_node, sample

pack = load_pack()
bridge = sys.modules[PACK_NAME + ".nodes._comfy"]
loading = importlib.import_module(PACK_NAME + ".step1x.checkpoints.loading")
for kind, folder in config["folders"].items():
    folder_paths.add_model_folder_path(kind, folder)

lazy_tensors = {}
assign = loading._assign
def counting_assign(model, *args, **kwargs):
    listed = set(model.state_dict())
    lazy_tensors[type(model).__name__] = sum(k not in listed for k in loading.declared_tensors(model))
    return assign(model, *args, **kwargs)
loading._assign = counting_assign

def run(tag):
    dit = run_node(pack, "Step1XEditDiTLoader", unet_name=config["dit"], weight_dtype=config["weight_dtype"],
                   attention="sdpa")[0]
    vae = run_node(pack, "Step1XEditVAELoader", vae_name=config["vae"])[0]
    mllm = run_node(pack, "Step1XEditMLLMLoader", mllm_name=config["mllm"], dtype="fp32", device="default")[0]
    original = image(96, 72)
    embeds = run_node(pack, "Step1XEditInstructionEncode", mllm=mllm, instruction="make the sky purple",
                      negative_prompt="", size_level=64, image=original)[0]
    cond = bind(pack, dit, embeds)
    edit = lambda model: sample(pack, model, cond, steps=2, reference_image=original, vae=vae)["samples"]
    out = {"embedding": embeds.cond.llm_embedding.float(), "edit": edit(dit)}
    lora = run_node(pack, "Step1XEditLoraLoader", model=dit, lora_name=config["lora"], strength=1.0)[0]
    out["lora_edit"], out["edit_after_lora"] = edit(lora), edit(dit)
    out["decoded"] = run_node(pack, "Step1XEditVAEDecode", vae=vae, samples={"samples": out["edit"]})[0]
    models = (dit.model, vae.autoencoder, mllm.encoder.model)
    facts = {"patchers": sorted({type(p.patcher).__name__ for p in (dit, lora, vae, mllm)}),
             "unloaded": sum(len(loading.unloaded_tensors(m)) for m in models),
             "lazy_tensors": dict(lazy_tensors),
             "dit_linear_tensors": sum(len(m.state_dict()) for m in dit.model.modules()
                                       if isinstance(m, torch.nn.Linear))}
    lazy_tensors.clear()
    return {f"{tag}.{k}": v.contiguous() for k, v in out.items()}, facts

tensors, facts = {}, {}
for tag, enabled in (("off", False), ("on", True)):
    comfy.memory_management.aimdo_enabled = enabled
    if enabled:  # what ComfyUI's start-up does when it turns dynamic VRAM on
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    probe = bridge.operations().Linear(4, 4)
    out, facts[tag] = run(tag)
    facts[tag]["probe_weight_is_none"] = probe.weight is None
    facts[tag]["patcher_class"] = bridge.patcher_class().__name__
    tensors.update(out)
save_file(tensors, config["out"], metadata={"facts": json.dumps(facts)})
"""


def write_lora(path: Path, model_dir: Path, dit: str) -> None:
    """A kohya LoRA on one attention projection of the tiny DiT, strong enough to change the edit."""
    from safetensors.torch import save_file

    with safe_open(model_dir / dit, framework="pt") as f:
        out, inp = f.get_slice("double_blocks.0.img_attn.qkv.weight").get_shape()
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({f"{name}.lora_up.weight": torch.randn(out, 4, generator=g),
               f"{name}.lora_down.weight": torch.randn(4, inp, generator=g), f"{name}.alpha": torch.tensor(4.0)},
              str(path))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_dynamic_vram")
    names = write_tiny_models(root / "models", tokenizer_for_tests(root / "tokenizer"))
    (root / "models" / "loras").mkdir()
    write_lora(root / "models" / "loras" / "tiny_lora.safetensors", root / "models" / "diffusion_models", names["dit"])
    return root, names


def run_in_comfyui(root: Path, names: dict, weight_dtype: str) -> tuple[dict, dict]:
    models = root / "models"
    config = {"folders": {kind: str(models / kind) for kind in ("diffusion_models", "vae", "text_encoders", "loras")},
              "dit": names["dit"], "vae": names["vae"], "mllm": names["mllm"], "lora": "tiny_lora.safetensors",
              "weight_dtype": weight_dtype, "out": str(root / f"dynamic_{weight_dtype}.safetensors")}
    run_script(SCRIPT, config, timeout=600)
    tensors, metadata = saved_tensors(config["out"])
    return tensors, json.loads(metadata["facts"])


@pytest.fixture(scope="module", params=["default", "fp8_e4m3fn"])
def in_comfyui(request, files):
    return run_in_comfyui(*files, request.param)


def test_forcing_the_mode_makes_comfyuis_layers_lazy_and_its_patcher_dynamic(in_comfyui):
    _, facts = in_comfyui
    assert facts["on"]["probe_weight_is_none"] and not facts["off"]["probe_weight_is_none"]
    assert facts["on"]["patcher_class"] == "ModelPatcherDynamic"
    assert facts["off"]["patcher_class"] == "ModelPatcher"


def test_every_linear_of_the_dit_is_built_lazily_and_the_models_load_completely(in_comfyui):
    _, facts = in_comfyui
    assert facts["on"]["lazy_tensors"]["Step1XEdit"] == facts["on"]["dit_linear_tensors"] > 0
    assert facts["off"]["lazy_tensors"] == {"Step1XEdit": 0, "AutoEncoder": 0}  # the VAE has no Linear
    assert facts["on"]["unloaded"] == 0 and facts["off"]["unloaded"] == 0


def test_the_models_are_registered_with_the_patcher_comfyui_gives_its_own_models(in_comfyui):
    _, facts = in_comfyui
    # on a CPU load device the dynamic patcher itself hands a model to a plain ModelPatcher
    assert facts["on"]["patchers"] == ["ModelPatcher"]


@pytest.mark.parametrize("result", ["embedding", "edit", "lora_edit", "edit_after_lora", "decoded"])
def test_every_result_equals_the_one_without_dynamic_vram(in_comfyui, result):
    tensors, _ = in_comfyui
    assert torch.equal(tensors[f"on.{result}"], tensors[f"off.{result}"])


def test_under_dynamic_vram_the_lora_changes_the_edit_and_comes_off_again(in_comfyui):
    tensors, _ = in_comfyui
    assert (tensors["on.lora_edit"] - tensors["on.edit"]).abs().max() > 1e-3
    assert torch.equal(tensors["on.edit_after_lora"], tensors["on.edit"])


# ------------------------------------------------------------------------------ the API workflow on a server

FORCE_DYNAMIC_VRAM = '''"""Test helper: turns ComfyUI's dynamic VRAM on as ComfyUI's start-up does on an NVIDIA GPU."""
import logging

import comfy.memory_management
import comfy.model_patcher
import comfy.ops

comfy.memory_management.aimdo_enabled = True
comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
logging.info("dynamic VRAM forced on; ComfyUI's Linear is built lazily: %s",
             comfy.ops.manual_cast.Linear(2, 2).weight is None)
NODE_CLASS_MAPPINGS = {}
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_dynamic_vram_base")
    prepare_base(base)
    (base / "custom_nodes" / "force_dynamic_vram").mkdir()
    (base / "custom_nodes" / "force_dynamic_vram" / "__init__.py").write_text(FORCE_DYNAMIC_VRAM, encoding="utf-8")
    (base / "models" / "loras").mkdir()
    write_lora(base / "models" / "loras" / "tiny_lora.safetensors", base / "models" / "diffusion_models",
               MODEL_NAMES["dit"])
    with serve(base) as srv:
        yield srv


def test_the_api_workflow_runs_with_dynamic_vram_forced_on(server):
    assert "dynamic VRAM forced on; ComfyUI's Linear is built lazily: True" in server.log.read_text(errors="replace")
    plain = saved_image(server, server.run(api_prompt(**{"7__seed": 3})))
    assert plain.shape[1::-1] == IMAGE_SIZE
    log = server.log.read_text(errors="replace")
    assert "Requested to load Step1XEdit" in log and "does not match the model" not in log


def test_a_lora_in_the_api_workflow_applies_under_dynamic_vram(server):
    lora = saved_image(server, server.run(with_lora(api_prompt(**{"7__seed": 3}), "tiny_lora.safetensors", 1.0)))
    plain = saved_image(server, server.run(api_prompt(**{"7__seed": 3})))
    assert (lora != plain).any()
