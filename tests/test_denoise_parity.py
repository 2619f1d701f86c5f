"""The sampler reproduces the official prepare + denoise + unpack loop (fp32, 10 steps, cfg 6)."""

import pytest
import torch
from safetensors.torch import load_file

from step1x.models.configs import TINY_DIT, with_version
from step1x.models.model import Step1XEdit
from step1x.sampling.denoise import TextConditioning, denoise, get_schedule

ATOL = 1e-5
CASES = [("denoise_v10_trunc1", "dit_v10", "v1.0", 1.0), ("denoise_v11_trunc093", "dit_v11", "v1.1", 0.93)]


def _run(official_dir, case, weights, version, threshold):
    model = Step1XEdit(with_version(TINY_DIT, version), dtype=torch.float32)
    model.load_state_dict(load_file(official_dir / f"{weights}_weights.safetensors"), strict=True)
    io = load_file(official_dir / f"{case}.safetensors")
    calls = []
    transformer = model.transformer

    def recording(img, img_ids, txt_ids, timesteps, txt, y, pe=None, cache=None):
        out = transformer(img, img_ids, txt_ids, timesteps, txt, y, pe, cache=cache)
        calls.append((img.clone(), timesteps.clone(), img_ids.clone(), out.clone()))
        return out

    model.transformer = recording
    llm, mask = io["in.llm_embedding"], io["in.mask"]
    with torch.no_grad():
        latent = denoise(
            model, io["in.x_noise"], TextConditioning(llm[:1], mask[:1]), TextConditioning(llm[1:], mask[1:]),
            reference=io["in.ref_latent"], steps=10, cfg_scale=6.0, renorm_threshold=threshold,
            compute_dtype=torch.float32,
        )
    return io, calls, latent


@pytest.mark.parametrize("case,weights,version,threshold", CASES)
def test_final_latent_matches_official(official_dir, case, weights, version, threshold):
    io, _, latent = _run(official_dir, case, weights, version, threshold)
    torch.testing.assert_close(latent, io["out.latent"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case,weights,version,threshold", CASES)
def test_every_step_input_matches_official(official_dir, case, weights, version, threshold):
    io, calls, _ = _run(official_dir, case, weights, version, threshold)
    assert len(calls) == 10
    torch.testing.assert_close(calls[0][2], io["prepared.img_ids"], atol=0, rtol=0)
    for n, (img, t_vec, _, out) in enumerate(calls):
        torch.testing.assert_close(img, io[f"step{n}.dit_in.img"], atol=ATOL, rtol=0)
        torch.testing.assert_close(t_vec, io[f"step{n}.dit_in.t_vec"], atol=0, rtol=0)
        torch.testing.assert_close(out, io[f"step{n}.dit_out"], atol=ATOL, rtol=0)


def test_schedule_matches_official(official_dir):
    io = load_file(official_dir / "denoise_v11_trunc093.safetensors")
    assert get_schedule(10, 16) == io["in.timesteps"].tolist()
