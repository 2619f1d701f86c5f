"""A GGUF DiT inside the real ComfyUI: the DiT loader lists and loads it, ComfyUI's model management counts
its quantised bytes, it samples as the library does, fully loaded and with every layer streamed (--lowvram
style), and a LoRA on its quantised layers is applied at call time (the stored bytes never change) with the
same result as the library's low-rank branch.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout) and optionally ``COMFYUI_PYTHON`` (its interpreter, with the gguf
package installed), as ``test_comfyui_server.py`` does. The API workflow on a GGUF DiT runs in that file.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from comfy_server import DIT_WITH_A_LORA, require_comfyui, run_script, saved_tensors
from node_support import lib

require_comfyui("to test GGUF models inside the real ComfyUI")

DIT = "step1x_tiny-Q8_0.gguf"
LORA_LAYERS = {"double_blocks.0.img_attn.qkv": (192, 64), "connector.S.input_embedder": (32, 48)}
"""A quantised block layer and a dense connector layer of the tiny DiT, (out, in)."""
STRENGTH = 0.7

SCRIPT = DIT_WITH_A_LORA + r"""
listed = pack.NODE_CLASS_MAPPINGS["Step1XEditDiTLoader"].INPUT_TYPES()["required"]["unet_name"][0]
layer = base.model.double_blocks[0].img_attn.qkv
stored = layer.weight.detach().clone()
out = {}
mm.load_models_gpu([base.patcher])
out["base_edit"] = edit(base)
mm.load_models_gpu([lora.patcher])
out["lora_edit"] = edit(lora)
out["lora_stored"] = layer.weight.detach().clone()
mm.load_models_gpu([base.patcher])
out["base_again"] = edit(base)
mm.unload_all_models()
for name, patcher in (("base", base), ("lora", lora)):
    patcher.patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # every layer cast per call
    out[name + "_lowvram_edit"] = edit(patcher)
    patcher.patcher.unpatch_model()
out["stored"] = stored
report = {"listed": listed, "model_size": base.patcher.model_size(), "class": type(layer).__name__,
          "qtype": layer.qtype.name, "dtype": str(base.compute_dtype), "weight_dtype": str(layer.weight.dtype),
          "quantized_bytes": sum(m.weight.numel() for m in base.model.modules() if getattr(m, "qtype", None)),
          "param_bytes": sum(p.numel() * p.element_size() for p in base.model.parameters())}
save_file({k: v.contiguous() for k, v in out.items()}, config["out"], metadata={"report": json.dumps(report)})
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_gguf")
    params = lib("tiny").tiny_dit_params(48)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = lib("models.model").Step1XEdit(params).state_dict()
    (root / "diffusion_models").mkdir()
    (root / "loras").mkdir()
    lib("checkpoints.gguf_convert").save_gguf(state, root / "diffusion_models" / DIT, "Q8_0", params=params)
    g = torch.Generator().manual_seed(3)
    lora = {}
    for layer, (out, inp) in LORA_LAYERS.items():
        name = "lora_unet_" + layer.replace(".", "_")
        lora[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.3
        lora[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.3
        lora[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(lora, str(root / "loras" / "lora.safetensors"))
    return root


@pytest.fixture(scope="module")
def in_comfyui(files):
    config = {"diffusion_models": str(files / "diffusion_models"), "loras": str(files / "loras"), "dit": DIT,
              "weight_dtype": "default", "lora": "lora.safetensors", "strength": STRENGTH,
              "out": str(files / "out.safetensors")}
    run_script(SCRIPT, config)
    out, metadata = saved_tensors(config["out"])
    return out, json.loads(metadata["report"])


@pytest.fixture(scope="module")
def library(files, in_comfyui):
    """The same runs in the library, headless: the LoRA as a low-rank branch beside the quantised layer."""
    loading, lora, sampling = lib("checkpoints.loading"), lib("checkpoints.lora"), lib("sampling.denoise")
    dtype = getattr(torch, in_comfyui[1]["dtype"].removeprefix("torch."))
    model = loading.load_dit(files / "diffusion_models" / DIT, compute_dtype=dtype, attention="sdpa")
    g = torch.Generator().manual_seed(0)
    text = sampling.TextConditioning(torch.randn(1, 8, model.params.connector.in_channels, generator=g),
                                     torch.ones(1, 8, dtype=torch.long))
    noise, reference = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)

    def edit():
        with torch.no_grad():
            return sampling.denoise(model, noise, text, None, reference=reference, steps=2, compute_dtype=dtype,
                                    device=torch.device("cpu"))

    base = edit()
    handle = lora.apply_lora(model, lora.load_lora(files / "loras" / "lora.safetensors", model), STRENGTH)
    assert len(handle.branches) == 1 and len(handle.merged) == 1
    return {"base_edit": base, "lora_edit": edit()}


def test_the_loader_lists_the_gguf_and_keeps_its_blocks_quantised(in_comfyui):
    _, report = in_comfyui
    assert DIT in report["listed"]
    assert report["class"] == "Linear" and report["qtype"] == "Q8_0" and report["weight_dtype"] == "torch.uint8"


def test_comfyuis_model_management_counts_the_quantised_bytes(in_comfyui):
    _, report = in_comfyui
    with torch.device("meta"):
        model = lib("models.model").Step1XEdit(lib("tiny").tiny_dit_params(48))
    blocks = sum(p.numel() for name, p in model.named_parameters()
                 if name.startswith(("double_blocks", "single_blocks")) and name.endswith("weight") and p.ndim == 2)
    assert report["quantized_bytes"] == blocks // 32 * 34
    assert report["model_size"] == report["param_bytes"]


def test_the_gguf_model_samples_in_comfyui_as_in_the_library(in_comfyui, library):
    out, _ = in_comfyui
    torch.testing.assert_close(out["base_edit"], library["base_edit"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["base_lowvram_edit"], library["base_edit"], atol=1e-5, rtol=1e-5)
    assert torch.equal(out["base_again"], out["base_edit"])


def test_a_lora_on_quantised_layers_is_applied_at_call_time_as_the_librarys_branch(in_comfyui, library):
    out, _ = in_comfyui
    assert (out["lora_edit"] - out["base_edit"]).abs().max() > 1e-3
    torch.testing.assert_close(out["lora_edit"], library["lora_edit"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["lora_lowvram_edit"], library["lora_edit"], atol=1e-5, rtol=1e-5)
    assert torch.equal(out["lora_stored"], out["stored"]), "the quantised bytes are never patched"
