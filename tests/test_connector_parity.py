"""The connector matches the official ``Qwen2Connector`` on the same random weights (fp32, 1e-5)."""

import pytest
import torch
from safetensors.torch import load_file

from step1x.models.configs import TINY_DIT, with_version
from step1x.models.connector import Qwen2Connector

ATOL = 1e-5


def _load(official_dir, tag, version):
    params = with_version(TINY_DIT, version).connector
    model = Qwen2Connector(params, dtype=torch.float32)
    model.load_state_dict(load_file(official_dir / f"connector_{tag}_weights.safetensors"), strict=True)
    return model.eval(), load_file(official_dir / f"connector_{tag}_io.safetensors")


@pytest.mark.parametrize("tag,version", [("v10", "v1.0"), ("v11", "v1.1")])
def test_connector_outputs_match_official(official_dir, tag, version):
    model, io = _load(official_dir, tag, version)
    with torch.no_grad():
        txt, pooled = model(io["in.llm_embedding"], io["in.t"], io["in.mask"])
    torch.testing.assert_close(txt, io["out.encoder_hidden_states"], atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, io["out.global_out"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("tag,version", [("v10", "v1.0"), ("v11", "v1.1")])
def test_connector_intermediates_match_official(official_dir, tag, version):
    model, io = _load(official_dir, tag, version)
    x, t, mask = io["in.llm_embedding"], io["in.t"] * 1000, io["in.mask"]
    s = model.S
    with torch.no_grad():
        torch.testing.assert_close(s.t_embedder(t), io["intermediate.S.t_embedder"], atol=ATOL, rtol=0)
        pooled_in = (x * mask.unsqueeze(-1)).sum(1) / mask.unsqueeze(-1).sum(1)
        torch.testing.assert_close(s.c_embedder(pooled_in), io["intermediate.S.c_embedder"], atol=ATOL, rtol=0)
        torch.testing.assert_close(s.input_embedder(x), io["intermediate.S.input_embedder"], atol=ATOL, rtol=0)


def test_v10_has_scale_factor_and_v11_has_none():
    assert "scale_factor" in Qwen2Connector(with_version(TINY_DIT, "v1.0").connector).state_dict()
    assert "scale_factor" not in Qwen2Connector(with_version(TINY_DIT, "v1.1").connector).state_dict()


def test_padded_queries_attend_to_first_token_only():
    from step1x.models.connector import refiner_attention_mask

    allowed = refiner_attention_mask(torch.tensor([[1, 1, 0]]))
    assert allowed[0, 0].tolist() == [[True, True, False], [True, True, False], [True, False, False]]
