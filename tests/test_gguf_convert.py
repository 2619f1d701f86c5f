"""``python -m step1x quantize``: the file it writes follows ComfyUI-GGUF's conventions for FLUX-style models
and the stated type policy, loads, and samples close to the source; it refuses the load-only types, an
existing output, a full disk and a file that is not the DiT, and an interrupted run leaves no file."""

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from step1x.checkpoints import gguf_convert
from step1x.checkpoints.gguf_convert import convert, planned_type
from step1x.checkpoints.loading import load_dit, save_with_config
from step1x.cli import main
from step1x.models.configs import TINY_DIT, with_version
from step1x.models.model import Step1XEdit
from step1x.sampling.denoise import TextConditioning, denoise, make_noise

PARAMS = with_version(TINY_DIT, "v1.1")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny DiT in bf16 under ComfyUI's key prefix, as a checkpoint saved from ComfyUI would be."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = Step1XEdit(PARAMS).state_dict()
    path = tmp_path_factory.mktemp("src") / "step1x_tiny.safetensors"
    save_with_config({"model.diffusion_model." + k: v.to(torch.bfloat16) for k, v in state.items()}, path, PARAMS)
    return path


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "step1x_tiny-Q4_0.gguf"
    assert main(["quantize", str(source), str(out), "--type", "Q4_0", "-q"]) == 0
    return out


def types_in(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_the_file_follows_comfyui_ggufs_conventions_for_flux_style_models(converted, source):
    reader = gguf.GGUFReader(converted)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[-1]]).decode() == "flux"
    assert "general.quantization_version" in reader.fields
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Step1XEdit(PARAMS).state_dict().items()}
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    assert shapes == expected, "official names without the prefix, dimensions stored innermost first"


def test_block_weights_get_the_type_small_tensors_f32_and_other_matrices_keep_the_source_precision(converted):
    types = types_in(converted)
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q4_0"
    assert types["single_blocks.1.linear2.weight"] == "Q4_0"
    assert types["double_blocks.0.img_attn.qkv.bias"] == "F32"
    assert types["double_blocks.0.img_attn.norm.query_norm.scale"] == "F32"
    assert types["connector.S.individual_token_refiner.blocks.0.mlp.fc1.weight"] == "BF16"
    assert types["txt_in.weight"] == types["final_layer.linear.weight"] == "BF16"
    assert sum(t == "Q4_0" for t in types.values()) == 2 * 10 + 2 * 3


def test_the_type_policy_as_stated():
    assert planned_type("double_blocks.3.img_mlp.0.weight", (12288, 3072), torch.bfloat16, "Q4_K") == "Q4_K"
    assert planned_type("double_blocks.3.img_mlp.0.weight", (12288, 3000), torch.bfloat16, "Q4_K") == "F16"
    assert planned_type("double_blocks.3.img_mlp.0.bias", (12288,), torch.bfloat16, "Q4_K") == "F32"
    assert planned_type("img_in.weight", (16, 64), torch.bfloat16, "Q8_0") == "F32"
    assert planned_type("connector.S.input_embedder.weight", (4096, 3584), torch.bfloat16, "Q8_0") == "BF16"
    assert planned_type("connector.S.input_embedder.weight", (4096, 3584), torch.float32, "Q8_0") == "F32"


def test_the_output_loads_and_samples_close_to_the_source(converted, source):
    g = torch.Generator().manual_seed(1)
    text = TextConditioning(torch.randn(1, 12, 48, generator=g), torch.ones(1, 12, dtype=torch.long))

    def run(path):
        with torch.no_grad():
            return denoise(load_dit(path, compute_dtype=torch.float32), make_noise((1, 16, 8, 8), 0), text, None,
                           reference=make_noise((1, 16, 8, 8), 1), steps=4, compute_dtype=torch.float32)

    expected, got = run(source), run(converted)
    assert (got - expected).norm() / expected.norm() < 0.02


def test_the_config_a_tiny_file_carries_travels_into_the_gguf(converted):
    fields = gguf.GGUFReader(converted).fields
    assert "step1x.config" in fields
    assert load_dit(converted, compute_dtype=torch.float32).params == PARAMS


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q2_K"])
def test_load_only_types_are_refused_by_the_converter(source, tmp_path, qtype):
    with pytest.raises(ValueError, match=f"{qtype} cannot be written here .* no {qtype} quantizer"):
        convert(source, tmp_path / "out.gguf", qtype)
    with pytest.raises(SystemExit):  # argparse: not among the choices
        main(["quantize", str(source), str(tmp_path / "out.gguf"), "--type", qtype])


def test_an_existing_output_is_kept_unless_forced(source, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    assert main(["quantize", str(source), str(out), "-q"]) == 2
    assert "out.gguf exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["quantize", str(source), str(out), "-q", "--force"]) == 0
    assert types_in(out)["double_blocks.0.img_mlp.0.weight"] == "Q8_0"
    assert capsys.readouterr().out.startswith(f"wrote {out}")


def test_a_full_disk_is_reported_before_anything_is_written(source, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_convert.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(ValueError, match=r"has 0.00 GiB free, but the Q8_0 file needs about"):
        convert(source, tmp_path / "out.gguf", "Q8_0")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_run_leaves_no_file(source, tmp_path, monkeypatch):
    calls = []
    real = gguf_convert.encode

    def interrupted(values, type_name):
        calls.append(type_name)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(values, type_name)

    monkeypatch.setattr(gguf_convert, "encode", interrupted)
    assert main(["quantize", str(source), str(tmp_path / "out.gguf"), "-q"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_the_dit_is_named_with_what_it_is(tmp_path):
    from helpers import sd_vae_state

    vae = tmp_path / "ae.safetensors"
    save_file(sd_vae_state(), str(vae))
    with pytest.raises(ValueError, match="ae.safetensors is a VAE, not a Step1X-Edit DiT"):
        convert(vae, tmp_path / "out.gguf", "Q8_0")


def test_a_gguf_input_and_a_non_gguf_output_name_are_refused(converted, source, tmp_path):
    with pytest.raises(ValueError, match="already a GGUF file"):
        convert(converted, tmp_path / "again.gguf", "Q8_0")
    with pytest.raises(ValueError, match=r"should end in \.gguf"):
        convert(source, tmp_path / "out.safetensors", "Q8_0")


def test_an_fp8_source_is_quantised_from_its_fp8_values(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        state = Step1XEdit(PARAMS).state_dict()
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 and k.startswith(("double_blocks", "single_blocks"))
           else v.to(torch.bfloat16) for k, v in state.items()}
    src = tmp_path / "fp8.safetensors"
    save_with_config(fp8, src, PARAMS)
    out = convert(src, tmp_path / "fp8-Q8_0.gguf", "Q8_0").path
    layer = load_dit(out, compute_dtype=torch.float32).double_blocks[0].img_mlp[0]
    expected = fp8["double_blocks.0.img_mlp.0.weight"].float()
    got = layer.dequantized_weight(torch.device("cpu"), torch.float32)
    assert (got - expected).abs().max() <= expected.abs().max() / 127
    assert np.isfinite(got.numpy()).all()
