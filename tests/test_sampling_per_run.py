"""Per-run caching: what does not depend on the timestep (the connector's masks, pooled vector, input and context
embeddings; the RoPE tables) is computed once per sampling run and per DiT call, and the results are the same bits
as evaluating the whole connector at every step."""

import pytest
import torch
from safetensors.torch import load_file

from step1x.checkpoints.loading import load_dit
from step1x.models.configs import TINY_DIT, with_version
from step1x.models.connector import Qwen2Connector
from step1x.sampling.denoise import TextConditioning, denoise, make_noise
from step1x.sampling.regione import RegionEConfig

STEPS = 4


class Counts:
    """Wraps the model's RoPE builder and its connector's per-run and per-step parts with call counters."""

    def __init__(self, model, patch):
        self.prepare = self.refine = self.rope = 0
        for name, owner in (("prepare", model.connector), ("refine", model.connector), ("rope", model)):
            patch.setattr(owner, name, self._counting(name, getattr(owner, name)))

    def _counting(self, name, fn):
        def counted(*args, **kwargs):
            setattr(self, name, getattr(self, name) + 1)
            return fn(*args, **kwargs)
        return counted


def _whole_connector(model):
    """The connector as a plain callable: evaluated whole at every step (no per-run preparation)."""
    return lambda x, t, mask: model.connector(x, t, mask)


def _sample(model, text, noise, **kw):
    with torch.no_grad():
        return denoise(model, noise, *text, reference=make_noise(noise.shape, 1), steps=STEPS, **kw)


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_prepare_then_refine_is_the_connector_forward_bit_for_bit(version):
    torch.manual_seed(3)
    connector = Qwen2Connector(with_version(TINY_DIT, version).connector, dtype=torch.float32).eval()
    x = torch.randn(2, 9, 48)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    t = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        prepared = connector.prepare(x, mask)
        for scale in (t, t / 2):
            txt, y = connector.refine(prepared, scale)
            whole_txt, whole_y = connector(x, scale, mask)
            assert torch.equal(txt, whole_txt) and torch.equal(y, whole_y)


@pytest.mark.parametrize("sequential, calls", [(False, 1), (True, 2)])
def test_official_run_prepares_each_call_once_and_builds_its_rope_once(tiny_dit, tiny_text, sequential, calls):
    noise = make_noise((2, 16, 8, 8), 0)
    with pytest.MonkeyPatch.context() as patch:
        counts = Counts(tiny_dit, patch)
        out = _sample(tiny_dit, tiny_text, noise, compute_dtype=torch.float32, sequential_cfg=sequential)
    assert (counts.prepare, counts.rope, counts.refine) == (calls, calls, calls * STEPS)
    whole = _sample(tiny_dit, tiny_text, noise, compute_dtype=torch.float32, sequential_cfg=sequential,
                    connector=_whole_connector(tiny_dit))
    assert torch.equal(out, whole)


def test_under_bfloat16_autocast_the_cached_parts_give_the_same_bits(tiny_dit, tiny_text):
    noise = make_noise((1, 16, 8, 8), 2)
    cached = _sample(tiny_dit, tiny_text, noise, compute_dtype=torch.bfloat16)
    whole = _sample(tiny_dit, tiny_text, noise, compute_dtype=torch.bfloat16, connector=_whole_connector(tiny_dit))
    assert torch.equal(cached, whole)


def test_regione_prepares_each_pass_once(tiny_dit, tiny_text):
    noise = make_noise((1, 16, 8, 8), 3)
    config = RegionEConfig(warmup_steps=2, post_steps=1, refresh_steps=())
    with pytest.MonkeyPatch.context() as patch:
        counts = Counts(tiny_dit, patch)
        out = _sample(tiny_dit, tiny_text, noise, compute_dtype=torch.float32, regione=config)
    assert (counts.prepare, counts.rope) == (1, 1) and counts.refine >= 1
    whole = _sample(tiny_dit, tiny_text, noise, compute_dtype=torch.float32, regione=config,
                    connector=_whole_connector(tiny_dit))
    assert torch.equal(out, whole)


@pytest.fixture(scope="module")
def v12(v12_models, v12_dir):
    ref = load_file(v12_dir / "denoise_v12.safetensors")

    def side(name, n=None):
        get = lambda key: ref[f"prompt.{name}.{key}"]  # noqa: E731
        text = TextConditioning(get("embedding"), get("mask"), get("txt_ids"), get("text_embeds"), get("text_masks"))
        if n is None:
            return text
        return TextConditioning(text.llm_embedding[:, :n], text.mask[:, :n], text.txt_ids[:n],
                                text.text_embeds[:, :n], text.text_mask[:, :n])

    return load_dit(v12_models, compute_dtype=torch.float32), side


def test_v12_prepares_each_row_and_side_once(v12):
    """Under the v1.2 rules every image row and CFG side is its own call with its own text length."""
    dit, side = v12
    cond, short, uncond = side("cond"), side("cond", 200), side("uncond")
    noise = make_noise((2, 16, 8, 8), 4)
    with pytest.MonkeyPatch.context() as patch:
        counts = Counts(dit, patch)
        out = _sample(dit, ([cond, short], uncond), noise, compute_dtype=torch.float32)
    assert (counts.prepare, counts.rope, counts.refine) == (4, 4, 4 * STEPS)
    whole = _sample(dit, ([cond, short], uncond), noise, compute_dtype=torch.float32, connector=_whole_connector(dit))
    assert torch.equal(out, whole)
