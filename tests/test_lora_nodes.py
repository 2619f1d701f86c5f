"""The LoRA loader node through the headless bridge: it returns a new model and leaves its input as it
was, the sampler sees the LoRA (in the connector too, with a conditioning bound to the model before the
LoRA), strength 0 is the base model, and a LoRA of another model is refused by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from node_support import bind, fake_embeds, lib, run_node, sample

NODE = "Step1XEditLoraLoader"
CONNECTOR_LAYER = "connector.S.individual_token_refiner.blocks.1.self_attn_proj"


def lora_file(path, shapes, layers, seed=0):
    g, tensors = torch.Generator().manual_seed(seed), {}
    for layer in layers:
        out, inp = shapes[layer]
        name = "lora_unet_" + layer.replace(".", "_")
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.2
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.2
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def base(pack, model_names):
    """A DiT of this module's own (the LoRA patches its module while a LoRA model is loaded)."""
    return run_node(pack, "Step1XEditDiTLoader", unet_name=model_names["dit"], weight_dtype="default",
                    attention="auto")[0]


@pytest.fixture(scope="module")
def loras(tmp_path_factory, bridge, base):
    folder = tmp_path_factory.mktemp("loras")
    shapes = lib("checkpoints.lora").linear_shapes(base.model)
    lora_file(folder / "blocks.safetensors", shapes, ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"])
    lora_file(folder / "connector_only.safetensors", shapes, [CONNECTOR_LAYER], seed=1)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)},
              str(folder / "sdxl_detail.safetensors"))
    bridge.register_model_folder("loras", folder)
    return folder


def apply(pack, model, name, strength=1.0):
    return run_node(pack, NODE, model=model, lora_name=name, strength=strength)[0]


def edit(pack, model, conditioning):
    return sample(pack, model, conditioning, reference_latent={"samples": torch.zeros(1, 16, 6, 8)})["samples"]


def test_the_dropdown_lists_the_loras_folder(pack, loras):
    choices = pack.NODE_CLASS_MAPPINGS[NODE].INPUT_TYPES()["required"]["lora_name"][0]
    assert {"blocks.safetensors", "connector_only.safetensors"} <= set(choices)


def test_the_output_is_a_new_model_and_the_input_stays_as_it_was(pack, base, loras):
    conditioning = bind(pack, base, fake_embeds(pack))
    before = edit(pack, base, conditioning)
    weights = {k: v.clone() for k, v in base.model.state_dict().items()}
    lora = apply(pack, base, "blocks.safetensors")
    assert lora is not base and lora.patcher is not base.patcher and base.patcher.loras == []
    assert lora.name == f"{base.name} + blocks.safetensors"
    with_lora = edit(pack, lora, conditioning)
    assert (with_lora - before).abs().max() > 1e-3
    assert torch.equal(edit(pack, base, conditioning), before)
    assert all(torch.equal(base.model.state_dict()[k], v) for k, v in weights.items())


def test_a_connector_lora_reaches_the_sampler_through_a_conditioning_of_the_base_model(pack, base, loras):
    conditioning = bind(pack, base, fake_embeds(pack))
    lora = apply(pack, base, "connector_only.safetensors")
    assert (edit(pack, lora, conditioning) - edit(pack, base, conditioning)).abs().max() > 1e-3
    assert torch.equal(edit(pack, lora, conditioning), edit(pack, lora, bind(pack, lora, fake_embeds(pack))))


def test_strength_zero_is_the_base_model(pack, base, loras):
    conditioning = bind(pack, base, fake_embeds(pack))
    unchanged = apply(pack, base, "blocks.safetensors", 0.0)
    assert unchanged is base, "strength 0 returns the input model itself"
    assert torch.equal(edit(pack, unchanged, conditioning), edit(pack, base, conditioning))


def test_chained_loaders_add_their_loras(pack, base, loras):
    conditioning = bind(pack, base, fake_embeds(pack))
    one = apply(pack, base, "blocks.safetensors")
    both = apply(pack, one, "connector_only.safetensors")
    assert [s for _, s in both.patcher.loras] == [1.0, 1.0] and len(one.patcher.loras) == 1
    results = [edit(pack, m, conditioning) for m in (base, one, both, one)]
    assert not torch.equal(results[1], results[2])
    assert torch.equal(results[1], results[3])


def test_a_lora_of_another_model_is_refused_by_name(pack, base, loras):
    with pytest.raises(ValueError, match=r"sdxl_detail\.safetensors is an SD1.x/SDXL LoRA"):
        apply(pack, base, "sdxl_detail.safetensors")


def test_a_missing_lora_file_says_where_to_put_it(pack, base, loras):
    with pytest.raises(FileNotFoundError, match="not found in the loras folders"):
        apply(pack, base, "missing.safetensors")
