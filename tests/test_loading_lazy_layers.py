"""Loading into layers built lazily, as ComfyUI builds its Linear under dynamic VRAM (``weight = None`` until a
state dict is loaded, so the layer is absent from ``state_dict()``): the DiT (from a .safetensors file, a diffusers
folder or a float GGUF), the VAE and the MLLM load the same numbers as with ordinary layers, and a file is blamed
only when the file is wrong.

``LazyOps`` reproduces the behaviour of ComfyUI's ``comfy.ops`` Linear with ``aimdo_enabled``; the real one is
exercised by ``test_comfyui_dynamic_vram.py`` inside a real ComfyUI."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from step1x.checkpoints.gguf_convert import save_gguf
from step1x.checkpoints.loading import declared_tensors, load_dit, load_vae, unloaded_tensors
from step1x.checkpoints.safetensors_file import CheckpointError
from step1x.models.model import Step1XEdit
from step1x.models.ops import CastLinear, CastOps
from step1x.sampling.denoise import TextConditioning, denoise

DIT = "step1x-edit-v1p1-official.safetensors"


class LazyLinear(CastLinear):
    """A Linear that owns no weight until loaded, and creates its parameters from the state dict it is given."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = None
        self.bias = None
        self.comfy_need_lazy_init_bias = bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for key, value in state_dict.items():
            name = key[len(prefix):]
            if name in ("weight", "bias"):
                setattr(self, name, nn.Parameter(value, requires_grad=False))
            else:
                unexpected_keys.append(key)


class LazyOps(CastOps):
    Linear = LazyLinear


class ForgetfulLinear(CastLinear):
    """A layer class that declares a bias but drops it when loaded (a layer fault, not a file fault)."""

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("bias")}
        super()._load_from_state_dict(state_dict, prefix, *args)


class ForgetfulOps(CastOps):
    Linear = ForgetfulLinear


def _edit(model: Step1XEdit) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    width = model.params.connector.in_channels
    text = TextConditioning(torch.randn(1, 8, width, generator=g), torch.ones(1, 8, dtype=torch.long))
    noise, reference = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    with torch.no_grad():
        return denoise(model, noise, text, None, reference=reference, steps=2, compute_dtype=torch.float32,
                       device=torch.device("cpu"))


def test_a_lazy_model_declares_the_tensors_of_an_ordinary_one(tiny_models):
    params = load_dit(tiny_models / DIT, compute_dtype=torch.float32).params
    with torch.device("meta"):
        lazy, eager = Step1XEdit(params, operations=LazyOps), Step1XEdit(params)
    assert "img_in.weight" not in lazy.state_dict(), "the stand-in must hide its weights as ComfyUI's layer does"
    assert declared_tensors(lazy) == {k: tuple(v.shape) for k, v in eager.state_dict().items()}
    assert set(unloaded_tensors(lazy)) == set(eager.state_dict())


def test_the_dit_loads_into_lazy_layers_with_the_same_numbers(tiny_models):
    eager = load_dit(tiny_models / DIT, compute_dtype=torch.float32)
    lazy = load_dit(tiny_models / DIT, compute_dtype=torch.float32, operations=LazyOps)
    assert isinstance(lazy.img_in, LazyLinear) and not unloaded_tensors(lazy)
    assert lazy.state_dict().keys() == eager.state_dict().keys()
    assert torch.equal(_edit(lazy), _edit(eager))


def test_fp8_block_weights_load_into_lazy_layers_as_fp8(tiny_models):
    lazy = load_dit(tiny_models / DIT, compute_dtype=torch.float32, weight_dtype="fp8_e4m3fn", operations=LazyOps)
    assert lazy.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert lazy.img_in.weight.dtype == torch.float32


def test_the_vae_loads_into_lazy_layers_with_the_same_numbers(tiny_models):
    eager = load_vae(tiny_models / "vae.safetensors")
    lazy = load_vae(tiny_models / "vae.safetensors", operations=LazyOps)
    assert not unloaded_tensors(lazy)
    for key, value in eager.state_dict().items():
        assert torch.equal(lazy.state_dict()[key], value), key


def test_a_diffusers_folder_loads_into_lazy_layers_with_the_same_numbers(v12_dir):
    folder = v12_dir / "dit_v11_diffusers"
    eager = load_dit(folder, compute_dtype=torch.float32)
    lazy = load_dit(folder, compute_dtype=torch.float32, operations=LazyOps)
    assert isinstance(lazy.img_in, LazyLinear) and not unloaded_tensors(lazy)
    assert lazy.state_dict().keys() == eager.state_dict().keys()
    assert all(torch.equal(lazy.state_dict()[k], v) for k, v in eager.state_dict().items())


def test_a_float_gguf_loads_into_lazy_layers_with_the_same_numbers(tmp_path, tiny_models):
    eager = load_dit(tiny_models / DIT, compute_dtype=torch.float32)
    path = save_gguf(eager.state_dict(), tmp_path / "tiny-F32.gguf", "F32", params=eager.params).path
    lazy = load_dit(path, compute_dtype=torch.float32, operations=LazyOps)
    assert isinstance(lazy.img_in, LazyLinear) and not unloaded_tensors(lazy)
    assert torch.equal(_edit(lazy), _edit(eager))


def test_a_file_lacking_a_tensor_is_blamed_under_lazy_layers(tmp_path, tiny_models):
    state = load_file(tiny_models / DIT)
    del state["double_blocks.0.img_attn.proj.weight"]
    save_file(state, str(tmp_path / "incomplete.safetensors"))
    with pytest.raises(CheckpointError, match=r"incomplete\.safetensors does not match .*1 missing .*img_attn\.proj"):
        load_dit(tmp_path / "incomplete.safetensors", compute_dtype=torch.float32, operations=LazyOps)


def test_a_tensor_of_the_wrong_shape_is_blamed_although_lazy_layers_would_take_it(tmp_path, tiny_models):
    state = load_file(tiny_models / DIT)
    state["single_blocks.0.linear2.weight"] = state["single_blocks.0.linear2.weight"][:, :-1].contiguous()
    save_file(state, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CheckpointError, match=r"mixed\.safetensors: 1 tensors .*single_blocks\.0\.linear2\.weight"):
        load_dit(tmp_path / "mixed.safetensors", compute_dtype=torch.float32, operations=LazyOps)


def test_layers_that_refuse_a_tensor_are_reported_without_blaming_the_file(tiny_models):
    with pytest.raises(RuntimeError, match=r"did not take .* The file is fine") as raised:
        load_dit(tiny_models / DIT, compute_dtype=torch.float32, operations=ForgetfulOps)
    assert not isinstance(raised.value, CheckpointError)
    assert "ForgetfulLinear" in str(raised.value)


def test_the_mllm_loads_into_a_lazy_linear(tiny_models, monkeypatch):
    from step1x.encoder import load_text_encoder, loader

    plain = load_text_encoder(tiny_models / "Qwen2.5-VL-7B-Instruct", dtype=torch.float32)
    original = loader.empty_model

    def with_a_lazy_layer(config, **kwargs):
        model = original(config, **kwargs)
        mlp = model.model.language_model.layers[0].mlp
        old = mlp.down_proj
        mlp.down_proj = LazyLinear(old.in_features, old.out_features, bias=old.bias is not None)
        return model

    monkeypatch.setattr(loader, "empty_model", with_a_lazy_layer)
    lazy = load_text_encoder(tiny_models / "Qwen2.5-VL-7B-Instruct", dtype=torch.float32)
    key = "model.language_model.layers.0.mlp.down_proj.weight"
    assert isinstance(lazy.model.model.language_model.layers[0].mlp.down_proj, LazyLinear)
    assert torch.equal(lazy.model.state_dict()[key], plain.model.state_dict()[key])
