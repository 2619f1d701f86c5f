"""The VAE matches the official ``AutoEncoder`` on the same random weights (fp32, 1e-5)."""

import pytest
import torch
from safetensors.torch import load_file

from step1x.models.autoencoder import AutoEncoder
from step1x.models.configs import TINY_VAE

ATOL = 1e-5


@pytest.fixture(scope="module")
def vae_io(official_dir):
    vae = AutoEncoder(TINY_VAE, dtype=torch.float32)
    vae.load_state_dict(load_file(official_dir / "vae_weights.safetensors"), strict=True)
    return vae.eval(), load_file(official_dir / "vae_io.safetensors")


def test_encoder_moments_match_official(vae_io):
    vae, io = vae_io
    with torch.no_grad():
        mean, logvar = vae.moments(io["in.image"])
    torch.testing.assert_close(mean, io["encoder.mean"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logvar, io["encoder.logvar"], atol=ATOL, rtol=0)


def test_sampled_encode_matches_official_with_its_noise(vae_io):
    vae, io = vae_io
    with torch.no_grad():
        z = vae.encode(io["in.image"], sample=True, noise=io["encode.eps"])
    torch.testing.assert_close(z, io["out.z_sample"], atol=ATOL, rtol=0)


def test_default_encode_is_the_deterministic_mean(vae_io):
    vae, io = vae_io
    with torch.no_grad():
        z = vae.encode(io["in.image"])
    torch.testing.assert_close(z, io["out.z_mean"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("which", ["z_sample", "z_mean"])
def test_decode_matches_official(vae_io, which):
    vae, io = vae_io
    with torch.no_grad():
        image = vae.decode(io[f"out.{which}"])
    torch.testing.assert_close(image, io[f"out.decoded_from_{which}"], atol=ATOL, rtol=0)


def test_raw_and_model_space_round_trip(vae_io):
    vae, io = vae_io
    z = io["out.z_mean"]
    torch.testing.assert_close(vae.to_model_space(vae.from_model_space(z)), z, atol=1e-6, rtol=0)


def test_sampling_with_a_seeded_generator_is_reproducible(vae_io):
    vae, io = vae_io
    with torch.no_grad():
        a = vae.encode(io["in.image"], sample=True, generator=torch.Generator().manual_seed(7))
        b = vae.encode(io["in.image"], sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, io["out.z_mean"])
