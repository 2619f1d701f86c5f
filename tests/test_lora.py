"""LoRA files on the tiny DiT: each key layout maps onto the official weights, merging adds exactly
``strength * scale * up @ down``, fp8 weights get an exact low-rank branch, and a LoRA of another model
fails with an error that names the file."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from step1x.checkpoints.loading import cast_model
from step1x.checkpoints.lora import CheckpointError, apply_lora, linear_shapes, load_lora, merge_lora, restore
from step1x.models.configs import TINY_DIT, with_version
from step1x.models.model import Step1XEdit
from step1x.sampling.denoise import denoise

RANK = 4
LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.1.linear1",
          "connector.S.individual_token_refiner.blocks.0.self_attn_qkv")


@pytest.fixture()
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Step1XEdit(with_version(TINY_DIT, "v1.1"), dtype=torch.float32).eval()


def pair(out: int, inp: int, seed: int, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g) * 0.1, torch.randn(rank, inp, generator=g) * 0.1


def kohya_lora(path, model, layers=LAYERS, alpha=2.0, zero_up=False) -> dict[str, tuple]:
    """A kohya-format LoRA file on ``layers``; returns {layer: (up, down)}."""
    shapes, tensors, pairs = linear_shapes(model), {}, {}
    for i, layer in enumerate(layers):
        up, down = pair(*shapes[layer], seed=i)
        up = torch.zeros_like(up) if zero_up else up
        name = "lora_unet_" + layer.replace(".", "_")
        tensors |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                    f"{name}.alpha": torch.tensor(alpha)}
        pairs[layer] = (up, down)
    save_file(tensors, str(path), metadata={"modelspec.architecture": "Step1X-Edit"})
    return pairs


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def edit(model, tiny_text) -> torch.Tensor:
    cond, uncond = tiny_text
    noise = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    reference = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return denoise(model, noise, cond, uncond, reference=reference, steps=2, compute_dtype=torch.float32,
                       device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------- key layouts


def test_a_kohya_lora_adds_exactly_strength_times_alpha_over_rank_times_up_down(model, tmp_path):
    pairs = kohya_lora(tmp_path / "k.safetensors", model, alpha=2.0)
    before = weights(model)
    patch = load_lora(tmp_path / "k.safetensors", model)
    assert patch.layouts == ("kohya",) and patch.unmatched == () and patch.touches_connector
    merge_lora(model, patch, strength=0.7)
    after = model.state_dict()
    for layer, (up, down) in pairs.items():
        key = layer + ".weight"
        assert torch.equal(after[key], before[key] + 0.7 * (2.0 / RANK) * (up @ down)), key
    assert all(torch.equal(after[k], v) for k, v in before.items() if k[: -len(".weight")] not in pairs)


@pytest.mark.parametrize("prefix, down_name, up_name", [
    ("transformer.", "lora_A.weight", "lora_B.weight"),
    ("base_model.model.", "lora_A.default.weight", "lora_B.default.weight"),
    ("diffusion_model.", "lora_down.weight", "lora_up.weight"),
    ("", "lora_A.weight", "lora_B.weight"),
])
def test_peft_and_comfyui_names_without_alpha_add_up_down_unscaled(model, tmp_path, prefix, down_name, up_name):
    layer = "single_blocks.0.linear2"
    up, down = pair(*linear_shapes(model)[layer], seed=5)
    save_file({f"{prefix}{layer}.{down_name}": down, f"{prefix}{layer}.{up_name}": up}, str(tmp_path / "p.safetensors"))
    before = model.state_dict()[layer + ".weight"].clone()
    patch = load_lora(tmp_path / "p.safetensors", model)
    assert patch.layouts == ("official names",)
    merge_lora(model, patch, strength=1.5)
    assert torch.equal(model.state_dict()[layer + ".weight"], before + 1.5 * 1.0 * (up @ down))


def test_diffusers_q_k_v_are_stacked_onto_the_fused_weights(model, tmp_path):
    shapes, hidden = linear_shapes(model), TINY_DIT.hidden_size
    parts = {"transformer.transformer_blocks.0.attn.to_q": 1.0, "transformer.transformer_blocks.0.attn.to_k": 2.0,
             "transformer.transformer_blocks.0.attn.add_v_proj": 4.0,
             "transformer.single_transformer_blocks.1.attn.to_v": 2.0,
             "transformer.single_transformer_blocks.1.proj_mlp": 1.0}
    tensors, pairs = {}, {}
    for i, (name, alpha) in enumerate(parts.items()):
        rows = 4 * hidden if name.endswith("proj_mlp") else hidden
        pairs[name] = pair(rows, hidden, seed=10 + i, rank=2 + i % 2)
        tensors |= {f"{name}.lora_B.weight": pairs[name][0], f"{name}.lora_A.weight": pairs[name][1],
                    f"{name}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(tmp_path / "d.safetensors"))
    before = weights(model)
    patch = load_lora(tmp_path / "d.safetensors", model)
    assert patch.layouts == ("diffusers",)
    merge_lora(model, patch, strength=1.0)

    def delta(name):
        up, down = pairs[name]
        return parts[name] / down.shape[0] * (up @ down)

    expected = {key: before[key].clone() for key in
                ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.weight",
                 "single_blocks.1.linear1.weight")}
    expected["double_blocks.0.img_attn.qkv.weight"][:hidden] += delta("transformer.transformer_blocks.0.attn.to_q")
    expected["double_blocks.0.img_attn.qkv.weight"][hidden: 2 * hidden] += delta(
        "transformer.transformer_blocks.0.attn.to_k")
    expected["double_blocks.0.txt_attn.qkv.weight"][2 * hidden:] += delta(
        "transformer.transformer_blocks.0.attn.add_v_proj")
    expected["single_blocks.1.linear1.weight"][2 * hidden: 3 * hidden] += delta(
        "transformer.single_transformer_blocks.1.attn.to_v")
    expected["single_blocks.1.linear1.weight"][3 * hidden:] += delta("transformer.single_transformer_blocks.1.proj_mlp")
    for key, value in expected.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)
    assert shapes["single_blocks.1.linear1"][0] == 7 * hidden


def test_diffsynth_names_reach_the_same_weights_as_kohya(model, tmp_path):
    layer, name = "double_blocks.1.txt_attn.proj", "blocks.1.attn.b_to_out"
    up, down = pair(*linear_shapes(model)[layer], seed=7)
    save_file({f"{name}.lora_A.default.weight": down, f"{name}.lora_B.default.weight": up},
              str(tmp_path / "ds.safetensors"))
    patch = load_lora(tmp_path / "ds.safetensors", model)
    assert patch.layouts == ("DiffSynth-Studio",) and patch.targets == [layer + ".weight"]


# ------------------------------------------------------------------------------------------- behaviour


def test_a_lora_with_zero_up_matrices_changes_nothing(model, tmp_path):
    kohya_lora(tmp_path / "zero.safetensors", model, zero_up=True)
    before = weights(model)
    merge_lora(model, load_lora(tmp_path / "zero.safetensors", model), strength=3.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_strength_zero_leaves_the_weights_as_they_were(model, tmp_path):
    kohya_lora(tmp_path / "k.safetensors", model)
    before = weights(model)
    merge_lora(model, load_lora(tmp_path / "k.safetensors", model), strength=0.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_the_edit_changes_with_the_lora_and_comes_back_without_it(model, tmp_path, tiny_text):
    kohya_lora(tmp_path / "k.safetensors", model)
    base = edit(model, tiny_text)
    handle = apply_lora(model, load_lora(tmp_path / "k.safetensors", model), 1.0, backup_device="cpu")
    with_lora = edit(model, tiny_text)
    handle.remove()
    assert (with_lora - base).abs().max() > 1e-3
    assert torch.equal(edit(model, tiny_text), base)


def test_a_backup_restores_merged_weights_bit_for_bit(model, tmp_path):
    kohya_lora(tmp_path / "k.safetensors", model)
    before, backup = weights(model), {}
    merge_lora(model, load_lora(tmp_path / "k.safetensors", model), strength=-2.0, backup=backup)
    assert set(backup) == {layer + ".weight" for layer in LAYERS}
    restore(model, backup)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_fp8_weights_keep_their_bits_and_get_an_exact_low_rank_branch(model, tmp_path, tiny_text):
    kohya_lora(tmp_path / "k.safetensors", model)
    cast_model(model, torch.float32, "fp8_e4m3fn")
    reference = Step1XEdit(model.params, dtype=torch.float32).eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    fp8 = weights(model)
    handle = apply_lora(model, load_lora(tmp_path / "k.safetensors", model), 0.8, backup_device="cpu")
    merge_lora(reference, load_lora(tmp_path / "k.safetensors", reference), 0.8)
    stored = {k: v.dtype for k, v in fp8.items()}
    assert stored["double_blocks.0.img_attn.qkv.weight"] == torch.float8_e4m3fn
    assert stored["connector.S.individual_token_refiner.blocks.0.self_attn_qkv.weight"] == torch.float32
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v.float(), fp8[k].float())}
    assert changed == {"connector.S.individual_token_refiner.blocks.0.self_attn_qkv.weight"}, "32-bit weights merge"
    torch.testing.assert_close(edit(model, tiny_text), edit(reference, tiny_text), rtol=1e-4, atol=1e-4)
    handle.remove()
    assert not [n for n, _ in model.named_modules() if "lora_branch" in n]


def test_two_loras_on_an_fp8_weight_get_a_branch_each_and_come_off_one_at_a_time(model, tmp_path, tiny_text):
    layer = LAYERS[0]
    for name in ("a", "b"):
        kohya_lora(tmp_path / f"{name}.safetensors", model, layers=(layer,))
    cast_model(model, torch.float32, "fp8_e4m3fn")
    linear = dict(model.named_modules())[layer]
    base = edit(model, tiny_text)
    first = apply_lora(model, load_lora(tmp_path / "a.safetensors", model), 1.0)
    with_first = edit(model, tiny_text)
    second = apply_lora(model, load_lora(tmp_path / "b.safetensors", model), 1.0)
    assert [n for n, _ in linear.named_children()] == ["lora_branch_0", "lora_branch_1"]
    first.remove()
    assert [n for n, _ in linear.named_children()] == ["lora_branch_1"]
    assert torch.equal(edit(model, tiny_text), with_first)  # the two files hold the same LoRA
    second.remove()
    assert torch.equal(edit(model, tiny_text), base) and not list(linear.named_children())


# ----------------------------------------------------------------------------------------------- errors


def _kohya_zero_file(path, name, down_shape, up_shape):
    """A kohya LoRA with one zero module ``name`` of the given down/up shapes."""
    save_file({f"{name}.lora_down.weight": torch.zeros(*down_shape), f"{name}.lora_up.weight": torch.zeros(*up_shape)},
              str(path))
    return path


def test_an_sdxl_lora_is_refused_with_the_file_name(model, tmp_path):
    _kohya_zero_file(tmp_path / "sdxl_style.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in",
                     (4, 320), (320, 4))
    with pytest.raises(CheckpointError, match=r"sdxl_style\.safetensors is an SD1.x/SDXL LoRA.*Expected a Step1X-Edit"):
        load_lora(tmp_path / "sdxl_style.safetensors", model)


def test_a_flux_lora_for_layers_step1x_lacks_is_refused(model, tmp_path):
    _kohya_zero_file(tmp_path / "flux_guidance.safetensors", "lora_unet_guidance_in_in_layer", (4, 256), (64, 4))
    with pytest.raises(CheckpointError, match=r"flux_guidance\.safetensors is a FLUX\.1 LoRA: none of its 1"):
        load_lora(tmp_path / "flux_guidance.safetensors", model)


def test_a_lora_of_a_model_of_another_size_is_refused_by_shape(model, tmp_path):
    _kohya_zero_file(tmp_path / "flux_full.safetensors", "lora_unet_double_blocks_0_img_attn_qkv", (4, 3072), (9216, 4))
    with pytest.raises(CheckpointError, match=r"flux_full\.safetensors does not fit.*\(192, 64\)"):
        load_lora(tmp_path / "flux_full.safetensors", model)


def test_a_partly_matching_lora_names_what_it_leaves_out(model, tmp_path, caplog):
    kohya_lora(tmp_path / "k.safetensors", model, layers=LAYERS[:1])
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "k.safetensors"))
    tensors |= {"lora_unet_guidance_in_in_layer.lora_down.weight": torch.zeros(4, 256),
                "lora_unet_guidance_in_in_layer.lora_up.weight": torch.zeros(64, 4),
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with caplog.at_level(logging.WARNING, logger="step1x.checkpoints.lora"):
        patch = load_lora(tmp_path / "mixed.safetensors", model)
    assert patch.targets == [LAYERS[0] + ".weight"]
    assert patch.unmatched == ("lora_unet_guidance_in_in_layer",)
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in patch.ignored
    assert "mixed.safetensors: 1 of its modules match no layer of this DiT" in caplog.text
    assert "lora_unet_guidance_in_in_layer" in caplog.text


@pytest.mark.parametrize("extra, message", [
    ({"lora_unet_single_blocks_0_linear2.dora_scale": torch.ones(1, 64)}, "is a DoRA file"),
    ({"lora_unet_single_blocks_0_linear2.hada_w1_a": torch.ones(64, 4)}, "is a LoHa file"),
])
def test_other_adapter_kinds_are_named_and_refused(model, tmp_path, extra, message):
    kohya_lora(tmp_path / "k.safetensors", model, layers=("single_blocks.0.linear2",))
    from safetensors.torch import load_file

    save_file(load_file(str(tmp_path / "k.safetensors")) | extra, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=f"other.safetensors {message}"):
        load_lora(tmp_path / "other.safetensors", model)


def test_a_module_without_its_up_matrix_is_an_incomplete_file(model, tmp_path):
    save_file({"lora_unet_single_blocks_0_linear2.lora_down.weight": torch.zeros(4, 64 * 5)},
              str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match="cut.safetensors: the LoRA module .* has only down"):
        load_lora(tmp_path / "cut.safetensors", model)


def test_a_pickle_lora_is_refused(model, tmp_path):
    (tmp_path / "old.pt").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle"):
        load_lora(tmp_path / "old.pt", model)
