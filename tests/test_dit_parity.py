"""The DiT forward matches the official ``Step1XEdit.forward`` on the same random weights (fp32, 1e-5)."""

import pytest
import torch
from safetensors.torch import load_file

from step1x.models.configs import TINY_DIT, with_version
from step1x.models.model import Step1XEdit

ATOL = 1e-5
CASES = [("v10", "v1.0"), ("v11", "v1.1")]


def _load(official_dir, tag, version):
    model = Step1XEdit(with_version(TINY_DIT, version), dtype=torch.float32)
    model.load_state_dict(load_file(official_dir / f"dit_{tag}_weights.safetensors"), strict=True)
    return model.eval(), load_file(official_dir / f"dit_{tag}_io.safetensors")


def _run(model, io, **kw):
    with torch.no_grad():
        return model(
            img=io["in.img"], img_ids=io["in.img_ids"], txt_ids=io["in.txt_ids"], timesteps=io["in.timesteps"],
            llm_embedding=io["in.llm_embedding"], t_vec=io["in.t_vec"], mask=io["in.mask"], **kw,
        )


@pytest.mark.parametrize("tag,version", CASES)
def test_dit_forward_matches_official(official_dir, tag, version):
    model, io = _load(official_dir, tag, version)
    torch.testing.assert_close(_run(model, io), io["out.pred"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("tag,version", CASES)
def test_rope_table_matches_official(official_dir, tag, version):
    model, io = _load(official_dir, tag, version)
    pe = model.rope(torch.cat((io["in.txt_ids"], io["in.img_ids"]), dim=1))
    torch.testing.assert_close(pe, io["intermediate.pe_embedder"], atol=0, rtol=0)


@pytest.mark.parametrize("tag,version", CASES)
def test_each_block_matches_official(official_dir, tag, version):
    """Feeds each block the official input of that block, so a mismatch is localised to one block."""
    model, io = _load(official_dir, tag, version)
    pe = io["intermediate.pe_embedder"]
    vec = io["intermediate.time_in"] + io["intermediate.vector_in"]
    img, txt = io["intermediate.img_in"], io["intermediate.txt_in"]
    with torch.no_grad():
        for i, block in enumerate(model.double_blocks):
            out_img, out_txt = block(img, txt, vec, pe)
            torch.testing.assert_close(out_img, io[f"intermediate.double_blocks.{i}.0"], atol=ATOL, rtol=0)
            torch.testing.assert_close(out_txt, io[f"intermediate.double_blocks.{i}.1"], atol=ATOL, rtol=0)
            img, txt = io[f"intermediate.double_blocks.{i}.0"], io[f"intermediate.double_blocks.{i}.1"]
        x = torch.cat((txt, img), 1)
        for i, block in enumerate(model.single_blocks):
            out = block(x, vec, pe)
            torch.testing.assert_close(out, io[f"intermediate.single_blocks.{i}"], atol=ATOL, rtol=0)
            x = io[f"intermediate.single_blocks.{i}"]


@pytest.mark.parametrize("tag,version", CASES)
def test_precomputed_rope_gives_identical_output(official_dir, tag, version):
    model, io = _load(official_dir, tag, version)
    pe = model.rope(torch.cat((io["in.txt_ids"], io["in.img_ids"]), dim=1))
    assert torch.equal(_run(model, io, pe=pe), _run(model, io))

