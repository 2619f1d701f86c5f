"""Checkpoint loading: the official key layout loads strictly, versions and dtypes are detected, and every
wrong file fails with an error that names it."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import flux_dev_state, sd_vae_state
from step1x.checkpoints.loading import inspect_dit, load_dit, load_vae, save_with_config
from step1x.checkpoints.safetensors_file import CheckpointError
from step1x.models.configs import TINY_DIT, ConnectorParams, DiTParams
from step1x.models.model import Step1XEdit

FP8 = torch.float8_e4m3fn


@pytest.fixture()
def dit_sd(official_dir):
    return load_file(official_dir / "dit_v10_weights.safetensors")


def _forward(model, io):
    with torch.no_grad():
        return model(io["in.img"], io["in.img_ids"], io["in.txt_ids"], io["in.timesteps"],
                     io["in.llm_embedding"], io["in.t_vec"], io["in.mask"])


@pytest.mark.parametrize("tag,version", [("v10", "v1.0"), ("v11", "v1.1")])
def test_official_layout_loads_and_detects_version(official_dir, tag, version):
    model = load_dit(official_dir / f"dit_{tag}_weights.safetensors", compute_dtype=torch.float32)
    assert model.version == version
    io = load_file(official_dir / f"dit_{tag}_io.safetensors")
    torch.testing.assert_close(_forward(model, io), io["out.pred"], atol=1e-5, rtol=0)


def test_shapes_give_the_architecture(official_dir):
    info = inspect_dit(official_dir / "dit_v11_weights.safetensors")
    assert info.params == replace(TINY_DIT, connector=replace(TINY_DIT.connector, has_scale_factor=False))
    assert info.stored_dtype == torch.float32


def test_config_of_a_file_without_metadata_is_inferred_at_the_real_head_dim(tmp_path):
    params = DiTParams(context_in_dim=128, hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1,
                       connector=ConnectorParams(in_channels=48, hidden_size=128, num_heads=1, depth=1))
    torch.manual_seed(0)
    save_file(Step1XEdit(params).state_dict(), str(tmp_path / "dit.safetensors"))
    assert inspect_dit(tmp_path / "dit.safetensors").params == params


def test_comfyui_prefix_is_stripped(tmp_path, dit_sd, official_dir):
    save_file({"model.diffusion_model." + k: v for k, v in dit_sd.items()}, str(tmp_path / "prefixed.safetensors"))
    model = load_dit(tmp_path / "prefixed.safetensors", compute_dtype=torch.float32)
    io = load_file(official_dir / "dit_v10_io.safetensors")
    torch.testing.assert_close(_forward(model, io), io["out.pred"], atol=1e-5, rtol=0)


def test_casting_to_fp8_stores_block_matrices_in_fp8_and_the_rest_in_compute_dtype(official_dir):
    model = load_dit(official_dir / "dit_v10_weights.safetensors", compute_dtype=torch.float32,
                     weight_dtype="fp8_e4m3fn")
    sd = model.state_dict()
    assert sd["double_blocks.0.img_attn.qkv.weight"].dtype == FP8
    assert sd["single_blocks.1.linear2.weight"].dtype == FP8
    assert sd["double_blocks.0.img_mod.lin.weight"].dtype == FP8
    for key in ("img_in.weight", "txt_in.weight", "final_layer.linear.weight", "double_blocks.0.img_attn.qkv.bias",
                "double_blocks.0.img_attn.norm.query_norm.scale", "connector.S.input_embedder.weight"):
        assert sd[key].dtype == torch.float32, key


def test_fp8_weights_halve_block_memory_versus_bf16(official_dir):
    path = official_dir / "dit_v10_weights.safetensors"
    bf16 = load_dit(path, compute_dtype=torch.bfloat16)
    fp8 = load_dit(path, compute_dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn")
    blocks = lambda m: sum(p.numel() * p.element_size() for n, p in m.named_parameters()  # noqa: E731
                           if n.startswith(("double_blocks", "single_blocks")) and p.ndim == 2)
    assert blocks(fp8) * 2 == blocks(bf16)


def test_fp8_model_stays_close_to_fp32(official_dir):
    path = official_dir / "dit_v10_weights.safetensors"
    io = load_file(official_dir / "dit_v10_io.safetensors")
    ref = _forward(load_dit(path, compute_dtype=torch.float32), io)
    out = _forward(load_dit(path, compute_dtype=torch.float32, weight_dtype="fp8_e4m3fn"), io)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.08, rel


def test_an_fp8_file_is_detected_and_kept_in_fp8(tmp_path, dit_sd):
    save_file({k: v.to(FP8) for k, v in dit_sd.items()}, str(tmp_path / "fp8.safetensors"))
    assert inspect_dit(tmp_path / "fp8.safetensors").stored_dtype == FP8
    model = load_dit(tmp_path / "fp8.safetensors", compute_dtype=torch.float32)
    assert model.state_dict()["double_blocks.1.txt_mlp.0.weight"].dtype == FP8
    assert model.state_dict()["double_blocks.1.txt_mlp.0.bias"].dtype == torch.float32


def _scaled_fp8(state: dict) -> dict:
    """ComfyUI's scaled-fp8 layout: each block matrix stored as fp8 of weight/scale, plus its ``scale_weight``."""
    out = {"scaled_fp8": torch.zeros(0, dtype=FP8)}
    for key, value in state.items():
        if key.startswith(("double_blocks", "single_blocks")) and value.ndim == 2:
            scale = value.abs().max() / 448
            out[key] = (value / scale).to(FP8)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            out[key] = value
    return out


def test_a_scaled_fp8_file_is_dequantised_with_its_scales(tmp_path, dit_sd):
    scaled = _scaled_fp8(dit_sd)
    save_file(scaled, str(tmp_path / "scaled.safetensors"))
    model = load_dit(tmp_path / "scaled.safetensors", compute_dtype=torch.float32)
    key = "double_blocks.0.img_attn.qkv.weight"
    weight = model.state_dict()[key]
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, scaled[key].float() * scaled[key[:-6] + "scale_weight"], atol=0, rtol=0)


def test_a_scaled_fp8_file_stays_closer_to_the_original_than_a_plain_fp8_cast(tmp_path, dit_sd, official_dir):
    save_file(_scaled_fp8(dit_sd), str(tmp_path / "scaled.safetensors"))
    save_file({k: v.to(FP8) for k, v in dit_sd.items()}, str(tmp_path / "plain.safetensors"))
    io = load_file(official_dir / "dit_v10_io.safetensors")
    error = {name: ((_forward(load_dit(tmp_path / f"{name}.safetensors", compute_dtype=torch.float32), io)
                     - io["out.pred"]).norm() / io["out.pred"].norm()).item() for name in ("scaled", "plain")}
    assert error["scaled"] < error["plain"], error


def test_an_fp8_file_can_be_upcast_on_load(tmp_path, dit_sd):
    save_file({k: v.to(FP8) for k, v in dit_sd.items()}, str(tmp_path / "fp8.safetensors"))
    model = load_dit(tmp_path / "fp8.safetensors", compute_dtype=torch.bfloat16, weight_dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_flux_checkpoint_as_dit_is_refused_by_name(tmp_path, dit_sd):
    save_file(flux_dev_state(dit_sd), str(tmp_path / "flux1-dev.safetensors"))
    with pytest.raises(CheckpointError, match=r"flux1-dev\.safetensors is a FLUX\.1-dev style DiT.*not a Step1X-Edit"):
        load_dit(tmp_path / "flux1-dev.safetensors")


def test_vae_as_dit_is_refused_by_name(official_dir):
    with pytest.raises(CheckpointError, match=r"vae_weights\.safetensors is a VAE, not a Step1X-Edit DiT"):
        load_dit(official_dir / "vae_weights.safetensors")


def test_dit_as_vae_is_refused_by_name(official_dir):
    with pytest.raises(CheckpointError, match=r"is a Step1X-Edit DiT, not a VAE"):
        load_vae(official_dir / "dit_v10_weights.safetensors")


def test_truncated_file_is_reported_as_truncated(tmp_path, official_dir):
    data = (official_dir / "dit_v10_weights.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is truncated.*download it again"):
        load_dit(tmp_path / "cut.safetensors")


def test_non_safetensors_file_is_refused(tmp_path):
    (tmp_path / "notes.safetensors").write_text("hello, this is not a model")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_dit(tmp_path / "notes.safetensors")


def test_pickle_checkpoint_is_never_loaded(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle"):
        load_dit(tmp_path / "model.ckpt")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"model file not found: .*absent\.safetensors"):
        load_dit(tmp_path / "absent.safetensors")


def test_missing_tensor_fails_instead_of_partial_load(tmp_path, dit_sd):
    broken = dict(dit_sd)
    del broken["single_blocks.1.linear2.weight"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. single_blocks\.1\.linear2\.weight\)"):
        load_dit(tmp_path / "broken.safetensors")


def test_vae_loads_from_official_layout(official_dir):
    vae = load_vae(official_dir / "vae_weights.safetensors")
    io = load_file(official_dir / "vae_io.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(io["in.image"]), io["out.z_mean"], atol=1e-5, rtol=0)


def test_four_channel_vae_is_refused(tmp_path):
    save_file(sd_vae_state(), str(tmp_path / "sdxl_vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"sdxl_vae\.safetensors is a 4-channel VAE.*16-channel FLUX VAE"):
        load_vae(tmp_path / "sdxl_vae.safetensors")


def test_a_vae_lacking_a_tensor_its_shape_is_read_from_is_named(tmp_path, official_dir):
    state = load_file(official_dir / "vae_weights.safetensors")
    del state["encoder.conv_out.weight"]
    save_file(state, str(tmp_path / "cut_vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"cut_vae\.safetensors looks like a VAE but lacks 'encoder\.conv_out"):
        load_vae(tmp_path / "cut_vae.safetensors")


@pytest.mark.parametrize("loader, weights", [(load_dit, "dit_v10_weights"), (load_vae, "vae_weights")])
def test_invalid_config_metadata_is_named(tmp_path, official_dir, loader, weights):
    save_file(load_file(official_dir / f"{weights}.safetensors"), str(tmp_path / "bad_meta.safetensors"),
              metadata={"step1x_config": "{not json"})
    with pytest.raises(CheckpointError, match=r"bad_meta\.safetensors: its step1x_config metadata is invalid"):
        loader(tmp_path / "bad_meta.safetensors")


def test_metadata_config_round_trips(tmp_path):
    params = replace(TINY_DIT, num_heads=2, axes_dim=(8, 12, 12))
    save_with_config(Step1XEdit(params).state_dict(), tmp_path / "m.safetensors", params)
    assert inspect_dit(tmp_path / "m.safetensors").params == params


def test_an_unavailable_attention_backend_fails_before_the_weights_are_read(official_dir, monkeypatch):
    from step1x.checkpoints import loading
    from step1x.models.attention import AttentionBackendError

    def no_reading(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading, "_assign", no_reading)
    monkeypatch.setattr(loading, "select_backend", lambda name: (_ for _ in ()).throw(AttentionBackendError(name)))
    with pytest.raises(AttentionBackendError):
        load_dit(official_dir / "dit_v10_weights.safetensors", attention="flash")
