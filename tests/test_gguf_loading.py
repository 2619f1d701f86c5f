"""Loading a GGUF DiT: every supported type loads with its block weights kept quantised (as uint8 bytes of
the true size) and everything else in the compute dtype; the version is read as from safetensors; a Q8_0
model samples close to fp32; LoRA, TeaCache and the attention backends act on a GGUF model as on the same
weights dequantised."""

import json
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch

from step1x.checkpoints.gguf_convert import Planned, planned_sizes, save_gguf, write_gguf
from step1x.checkpoints.gguf_file import read_gguf
from step1x.checkpoints.loading import inspect_dit, load_dit
from step1x.checkpoints.lora import apply_lora, load_lora, merge_lora
from step1x.models.attention import installed_backends
from step1x.models.configs import TINY_DIT, with_version
from step1x.models.dequant import QUANT_TYPES
from step1x.models.model import Step1XEdit
from step1x.models.quantized import QuantizedLinear, is_quantized
from step1x.sampling.denoise import TextConditioning, denoise, make_noise

WIDE = with_version(replace(TINY_DIT, hidden_size=256, num_heads=16, depth=1, depth_single_blocks=1), "v1.1")
"""A tiny DiT whose block matrices all have rows of 256 weights, so every type applies (K-quants included)."""
BLOCK_WEIGHTS = 13
"""Linear weights of one double and one single block."""
Q8_0_LATENT_ATOL, Q8_0_LATENT_RTOL = 5e-3, 1e-3
"""A 10-step Q8_0 denoise against fp32: largest latent difference, and difference norm / latent norm."""
FLOAT = ("F32", "F16", "BF16")


def seeded_model(params=WIDE, seed=0) -> Step1XEdit:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Step1XEdit(params).eval()


@pytest.fixture(scope="module")
def reference() -> Step1XEdit:
    return seeded_model()


@pytest.fixture(scope="module")
def files(tmp_path_factory, reference):
    root = tmp_path_factory.mktemp("gguf")
    return {q: save_gguf(reference.state_dict(), root / f"wide_{q}.gguf", q, params=WIDE).path for q in QUANT_TYPES}


@pytest.fixture()
def text():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 24, WIDE.connector.in_channels, generator=g)
    mask = torch.zeros(2, 24, dtype=torch.long)
    mask[0, :17], mask[1, :6] = 1, 1
    emb = emb * mask.unsqueeze(-1)
    return TextConditioning(emb[:1], mask[:1]), TextConditioning(emb[1:], mask[1:])


def run(model, text, steps=10, **kw):
    cond, uncond = text
    with torch.no_grad():
        return denoise(model, make_noise((1, 16, 8, 8), 0), cond, uncond, reference=make_noise((1, 16, 8, 8), 1),
                       steps=steps, compute_dtype=torch.float32, **kw)


def dequantized_copy(model: Step1XEdit) -> Step1XEdit:
    """A plain float32 model holding the weights ``model`` computes with."""
    dense = seeded_model(model.params)
    state = {}
    for name, module in model.named_modules():
        for key, value in module.named_parameters(recurse=False):
            full = f"{name}.{key}" if name else key
            if key == "weight" and is_quantized(module):
                value = module.dequantized_weight(torch.device("cpu"), torch.float32)
            state[full] = value.float()
    dense.load_state_dict(state)
    return dense


# ----------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
def test_every_type_loads_with_its_block_weights_kept_as_stored(files, qtype):
    model = load_dit(files[qtype], compute_dtype=torch.float32)
    blocks = [m for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks"))]
    assert len(blocks) == BLOCK_WEIGHTS
    for layer in blocks:
        if qtype in FLOAT:
            assert not is_quantized(layer) and layer.weight.dtype == torch.float32
        else:
            assert layer.qtype.name == qtype and layer.weight.dtype == torch.uint8
            assert layer.weight.numel() == QUANT_TYPES[qtype].n_bytes(layer.in_features * layer.out_features)
    rest = [p for name, p in model.named_parameters() if not name.startswith(("double_blocks", "single_blocks"))]
    assert all(p.dtype == torch.float32 for p in rest)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q6_K", "Q3_K"])
def test_a_layer_computes_with_the_weight_gguf_decodes_from_the_file(files, qtype):
    model = load_dit(files[qtype], compute_dtype=torch.float32)
    key = "single_blocks.0.linear2.weight"
    stored = next(t for t in gguf.GGUFReader(files[qtype]).tensors if t.name == key)
    expected = gguf.quants.dequantize(stored.data, stored.tensor_type)
    layer = model.single_blocks[0].linear2
    got = layer.dequantized_weight(torch.device("cpu"), torch.float32)
    np.testing.assert_array_equal(got.numpy(), expected)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, got, layer.bias), atol=0, rtol=0)


def test_resident_bytes_are_the_quantised_sizes_the_size_table_counts(files):
    model = load_dit(files["Q4_K"], compute_dtype=torch.float32)
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = planned_sizes(WIDE, "Q4_K", source=torch.float32, compute=torch.float32)
    assert resident == sizes.resident
    assert sizes.quantized == sum(m.weight.numel() for m in model.modules() if is_quantized(m))
    assert files["Q4_K"].stat().st_size <= sizes.file + 65536
    bf16 = load_dit(files["BF16"], compute_dtype=torch.bfloat16)
    assert resident < sum(p.numel() * p.element_size() for p in bf16.parameters())


def test_the_compute_dtype_is_used_for_everything_left_dense(files):
    model = load_dit(files["Q8_0"], compute_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.uint8, torch.bfloat16}


def test_an_explicit_weight_dtype_dequantises_the_blocks_at_load(files):
    model = load_dit(files["Q8_0"], compute_dtype=torch.float32, weight_dtype="bf16")
    assert not any(is_quantized(m) for m in model.modules())
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_the_version_is_detected_from_the_keys_as_for_safetensors(tmp_path, version):
    params = with_version(WIDE, version)
    path = save_gguf(seeded_model(params).state_dict(), tmp_path / "dit.gguf", "Q8_0").path  # no stored config
    info = inspect_dit(path)
    assert info.version == version and info.params == params
    assert info.stored_dtype == torch.uint8
    assert read_gguf(path).architecture == "flux"
    assert load_dit(path, compute_dtype=torch.float32).version == version


# ---------------------------------------------------------------------------------------------- sampling


def test_a_q8_0_denoise_is_close_to_the_fp32_result(files, reference, text):
    expected = run(reference, text)
    got = run(load_dit(files["Q8_0"], compute_dtype=torch.float32), text)
    torch.testing.assert_close(got, expected, atol=Q8_0_LATENT_ATOL, rtol=0)
    assert (got - expected).norm() / expected.norm() < Q8_0_LATENT_RTOL


def test_an_f32_file_samples_exactly_as_the_model_it_was_written_from(files, reference, text):
    torch.testing.assert_close(run(load_dit(files["F32"], compute_dtype=torch.float32), text, steps=3),
                               run(reference, text, steps=3), atol=0, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0"])
def test_a_gguf_model_samples_as_its_dequantised_weights_do(files, text, qtype):
    model = load_dit(files[qtype], compute_dtype=torch.float32)
    torch.testing.assert_close(run(model, text, steps=3), run(dequantized_copy(model), text, steps=3),
                               atol=1e-5, rtol=1e-5)


def test_teacache_skips_the_same_steps_on_a_gguf_model(files, text):
    model = load_dit(files["Q8_0"], compute_dtype=torch.float32)
    dense = dequantized_copy(model)
    calls = {"gguf": [], "dense": []}
    handles = [m.double_blocks[0].register_forward_hook(lambda *a, key=key: calls[key].append(1))
               for key, m in (("gguf", model), ("dense", dense))]
    try:
        got = run(model, text, steps=8, teacache=0.3)
        expected = run(dense, text, steps=8, teacache=0.3)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls["gguf"]) == len(calls["dense"]) < 8
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", installed_backends())
def test_every_installed_attention_backend_runs_a_gguf_model(files, text, backend):
    model = load_dit(files["Q4_0"], compute_dtype=torch.float32, attention=backend)
    dense = dequantized_copy(model)
    dense.set_attention_backend(backend)
    assert model.attention_backend == backend
    torch.testing.assert_close(run(model, text, steps=2), run(dense, text, steps=2), atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- LoRA


@pytest.fixture()
def lora_file(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    tensors = {}
    for layer, (out, inp) in {"double_blocks.0.img_attn.qkv": (768, 256), "single_blocks.0.linear2": (256, 1280),
                              "connector.S.input_embedder": (32, 48)}.items():
        name = "lora_unet_" + layer.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.2
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.2
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    return path


def test_a_lora_on_a_gguf_model_equals_the_lora_merged_into_the_dequantised_weights(files, text, lora_file):
    model = load_dit(files["Q4_K"], compute_dtype=torch.float32)
    dense = dequantized_copy(model)
    patch = load_lora(lora_file, model)
    handle = apply_lora(model, patch, 0.8)
    merge_lora(dense, patch, 0.8)
    assert len(handle.branches) == 2 and [m.target for m in handle.merged] == ["connector.S.input_embedder.weight"]
    torch.testing.assert_close(run(model, text, steps=3), run(dense, text, steps=3), atol=1e-5, rtol=1e-5)
    before = model.double_blocks[0].img_attn.qkv.weight.clone()
    handle.remove()
    assert torch.equal(model.double_blocks[0].img_attn.qkv.weight, before)
    assert not any(name.startswith("lora_branch") for name, _ in model.named_children())


def test_merging_a_lora_into_quantised_weights_is_refused(files, lora_file):
    model = load_dit(files["Q8_0"], compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="double_blocks.0.img_attn.qkv.weight is stored quantised .* Use apply_lora"):
        merge_lora(model, load_lora(lora_file, model))


def test_the_quantised_linear_is_a_plain_cast_linear_until_it_holds_quantised_bytes():
    layer = QuantizedLinear(8, 4)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=0, rtol=0)


# ------------------------------------------------------------------------------- files from other tools


def test_a_file_with_the_connector_and_embedders_quantised_too_loads_them_dense(tmp_path, reference):
    """ComfyUI-GGUF's llama.cpp route also quantises the connector; such tensors are dequantised at load."""
    def kind(value):
        return "Q8_0" if value.ndim == 2 and value.numel() > 1024 and value.shape[-1] % 32 == 0 else "F32"

    state = reference.state_dict()
    planned = [Planned(k, tuple(v.shape), kind(v), lambda v=v: v) for k, v in state.items()]
    path = write_gguf(tmp_path / "all-Q8_0.gguf", planned, file_type="Q8_0",
                      metadata={"step1x.config": json.dumps(WIDE.to_dict())}).path
    assert read_gguf(path).tensors["connector.S.individual_token_refiner.blocks.0.mlp.fc2.weight"].qtype.name == "Q8_0"
    model = load_dit(path, compute_dtype=torch.float32)
    fc2 = model.connector.S.individual_token_refiner.blocks[0].mlp.fc2
    assert not is_quantized(fc2) and fc2.weight.dtype == torch.float32
    original = state["connector.S.individual_token_refiner.blocks.0.mlp.fc2.weight"]
    assert 0 < (fc2.weight - original).abs().max() <= original.abs().max() / 127
    assert is_quantized(model.double_blocks[0].img_mlp[0])


def test_a_tensor_stored_reshaped_takes_its_comfy_gguf_orig_shape(tmp_path, reference):
    state = reference.state_dict()
    writer = gguf.GGUFWriter(str(tmp_path / "reshaped.gguf"), "flux")
    writer.add_string("step1x.config", json.dumps(WIDE.to_dict()))
    for key, value in state.items():
        data = value.numpy()
        if key == "img_in.weight":
            writer.add_array("comfy.gguf.orig_shape.img_in.weight", list(data.shape))
            data = data.reshape(-1, 256)
        writer.add_tensor(key, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = load_dit(tmp_path / "reshaped.gguf", compute_dtype=torch.float32)
    assert torch.equal(model.img_in.weight, state["img_in.weight"])


def test_the_dequantisation_workspace_is_the_largest_quantised_layer_in_float32_plus_the_compute_dtype(files):
    from step1x.models.quantized import dequant_workspace_bytes

    model = load_dit(files["Q8_0"], compute_dtype=torch.bfloat16)
    assert dequant_workspace_bytes(model, torch.bfloat16) == 1792 * 256 * (4 + 2)  # single_blocks.0.linear1
    assert dequant_workspace_bytes(load_dit(files["BF16"]), torch.bfloat16) == 0
