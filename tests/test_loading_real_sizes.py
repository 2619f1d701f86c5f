"""The released checkpoints' architecture is read from their tensor shapes alone. The files here hold the
real-size headers of the official key layout over sparse (unwritten) data, so no weights are needed."""

import json
import struct

import pytest
import torch

from step1x.checkpoints.loading import inspect_dit, inspect_vae
from step1x.models.autoencoder import AutoEncoder
from step1x.models.configs import FLUX_VAE, STEP1X_EDIT, with_version
from step1x.models.model import Step1XEdit

SAFETENSORS_DTYPES = {torch.float32: ("F32", 4), torch.bfloat16: ("BF16", 2), torch.float8_e4m3fn: ("F8_E4M3", 1)}


def header_only_file(path, module: torch.nn.Module, dtype: torch.dtype) -> None:
    """A safetensors file with ``module``'s keys and shapes in ``dtype`` whose data is a sparse hole."""
    name, size = SAFETENSORS_DTYPES[dtype]
    header, offset = {}, 0
    for key, tensor in module.state_dict().items():
        nbytes = tensor.numel() * size
        header[key] = {"dtype": name, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_the_released_dit_is_recognised_with_its_version(tmp_path, version):
    params = with_version(STEP1X_EDIT, version)
    with torch.device("meta"):
        model = Step1XEdit(params)
    header_only_file(tmp_path / "dit.safetensors", model, torch.bfloat16)
    info = inspect_dit(tmp_path / "dit.safetensors")
    assert info.params == params and info.version == version and info.stored_dtype == torch.bfloat16


def test_an_fp8_conversion_of_the_released_dit_is_recognised_as_fp8(tmp_path):
    with torch.device("meta"):
        model = Step1XEdit(STEP1X_EDIT)
    header_only_file(tmp_path / "dit_fp8.safetensors", model, torch.float8_e4m3fn)
    assert inspect_dit(tmp_path / "dit_fp8.safetensors").stored_dtype == torch.float8_e4m3fn


def test_the_flux_vae_is_recognised_from_its_shapes(tmp_path):
    with torch.device("meta"):
        vae = AutoEncoder(FLUX_VAE)
    header_only_file(tmp_path / "ae.safetensors", vae, torch.float32)
    _, prefix, params = inspect_vae(tmp_path / "ae.safetensors")
    assert prefix == "" and params == FLUX_VAE
