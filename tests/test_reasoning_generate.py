"""Generation on a real (tiny) Qwen2.5-VL: the reference's think call, greedy and sampled with seed 0, gives the
recorded tokens; seeding, cancellation and progress behave."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reasoning_support import SOURCE_SEED, fixture_image, load_fixture_qwen, qwen_tokenizer, thinker_record
from step1x.reasoning import CannotGenerateError, GenerationSettings, QwenGenerator, ReasoningCancelled
from step1x.reasoning import messages as M


@pytest.fixture(scope="module")
def record(v12_dir):
    return thinker_record(v12_dir)


@pytest.fixture(scope="module")
def model(v12_dir):
    return load_fixture_qwen(v12_dir / "tiny_qwen25vl")


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return qwen_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def think_call(record):
    return M.think_call(fixture_image(1024, 768, SOURCE_SEED), record["call_inputs"]["en"]["instruction"])


def short(**kwargs) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=6, **kwargs)


def test_greedy_reply_matches(model, tokenizer, think_call, record):
    expected = record["tiny_model_generate"]["greedy"]
    reply = QwenGenerator(model, tokenizer, settings=GenerationSettings(do_sample=False))(think_call)
    assert reply == expected["returned_text"]
    assert tokenizer(reply, add_special_tokens=False)["input_ids"] == expected["returned_text_token_ids"]


def test_sampled_reply_with_seed_0_matches(model, tokenizer, think_call, record):
    expected = record["tiny_model_generate"]["code_kwargs_seed0"]
    reply = QwenGenerator(model, tokenizer, seed=0)(think_call)
    assert reply == expected["returned_text"]
    assert tokenizer(reply, add_special_tokens=False)["input_ids"] == expected["returned_text_token_ids"]


def test_seed_makes_runs_repeatable_and_retries_differ(model, tokenizer, think_call):
    first = QwenGenerator(model, tokenizer, settings=short(), seed=3)
    second = QwenGenerator(model, tokenizer, settings=short(), seed=3)
    a = [first(think_call), first(think_call)]
    b = [second(think_call), second(think_call)]
    assert a == b
    assert a[0] != a[1]


def test_seeded_sampling_leaves_the_global_generator_alone(model, tokenizer, think_call):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    QwenGenerator(model, tokenizer, settings=short(), seed=3)(think_call)
    assert torch.equal(torch.get_rng_state(), before)


def test_progress_counts_tokens(model, tokenizer, think_call):
    seen = []
    QwenGenerator(model, tokenizer, settings=short(do_sample=False), on_token=lambda n, total: seen.append((n, total)))(
        think_call
    )
    assert seen == [(n, 6) for n in range(1, 7)]


def test_cancel_between_tokens(model, tokenizer, think_call):
    seen = []
    generator = QwenGenerator(
        model, tokenizer, settings=short(do_sample=False),
        on_token=lambda n, total: seen.append(n), should_stop=lambda: len(seen) >= 2,
    )
    with pytest.raises(ReasoningCancelled):
        generator(think_call)
    assert seen == [1, 2]


def test_cancel_before_a_call(model, tokenizer, think_call):
    generator = QwenGenerator(model, tokenizer, should_stop=lambda: True)
    with pytest.raises(ReasoningCancelled):
        generator(think_call)


def test_model_without_lm_head_is_refused(model, tokenizer):
    class Headless(nn.Module):
        lm_head = nn.Identity()

        def generate(self):
            pass

    with pytest.raises(CannotGenerateError, match="language-model head"):
        QwenGenerator(Headless(), tokenizer)


def test_max_new_tokens_must_be_positive():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)


def test_whole_loop_runs_on_the_real_model(model, tokenizer):
    """Noise replies from the tiny model: the description is taken, everything else falls back after its
    attempts; two-image calls (reflection, score1) go through generate() as well."""
    from PIL import Image

    from step1x.reasoning import Thinker, reason_edit
    from step1x.reasoning import prompts as P

    generator = QwenGenerator(model, tokenizer, settings=GenerationSettings(max_new_tokens=4), seed=0)
    thinker = Thinker(generator, retries=2)
    original = fixture_image(64, 48, seed=7)
    edits = []

    def edit(image, instruction, index):
        edits.append((image, instruction))
        return Image.new("RGB", image.size, (index * 50, 0, 0))

    result = reason_edit(original, "Make the sky purple.", edit, thinker, think=True, reflect=True, max_tries=2)
    assert result.think.rewritten and result.reformat_prompt == result.think.reply
    assert result.think_info == [P.FAILED_REFLECTION] * 2
    assert result.calls_per_try() == [1 + 2 + 2 + 2] * 2
    assert [c.kind for c in result.calls].count(M.SCORE1) == 4 and M.REFLECT not in {c.kind for c in result.calls}
    assert all(image is original for image, _ in edits)
    assert result.best_index == 1
