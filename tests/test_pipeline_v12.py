"""Step1X-Edit v1.2 through ``Step1XPipeline`` on a tiny model folder in the released diffusers layout: the
version comes from the weights and picks the v1.2 encoder layout and sampler; plain edits, text-to-image and
the reasoning loop (scripted replies, and one real reply of the tiny text encoder); offloading keeps the DiT and
the encoder apart; bad inputs are refused with what to do."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import seeded_image
from step1x.geometry import resize_to_size_level
from step1x.pipeline import EditOptions, Step1XPipeline
from step1x.pipeline_v12 import ModuleStages, ReasoningOptions, reference_latent
from step1x.reasoning import CannotGenerateError
from step1x.reasoning import messages as M
from step1x.reasoning.prompts import FAILED_REFLECTION
from step1x.reasoning.scripted import EXAMPLE_SCRIPT, ScriptedGenerator
from step1x.sampling import v12
from step1x.sampling.regione_rules import RegionEConfig

FAST = EditOptions(steps=3, size_level=64, seed=7)
PROMPT = 'make the sky purple and write "HI" on the wall'


@pytest.fixture(scope="module")
def pipe(tiny_v12_folder):
    return Step1XPipeline.from_folder(tiny_v12_folder, device="cpu", compute_dtype=torch.float32, generation=True)


@pytest.fixture(scope="module")
def image():
    return seeded_image(96, 64, seed=3)


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------------------------------ plain edits


def test_the_folder_loads_as_v12_with_its_own_text_encoder(pipe, tiny_v12_folder):
    assert pipe.version == "v1.2"
    assert pipe.encoder.source == tiny_v12_folder / "text_encoder" and pipe.encoder.can_generate


def test_a_plain_edit_is_the_v12_edit_of_the_v12_encoding(pipe, image):
    cond, uncond = pipe.encoder.encode_pair_v12(resize_to_size_level(image, 64), PROMPT)
    expected = v12.edit(pipe.dit, pipe.vae, image, cond, uncond, v12.V12Options(steps=3, size_level=64, seed=7),
                        dtype=torch.float32)
    result = pipe.edit(image, PROMPT, FAST)
    assert result.size == image.size
    np.testing.assert_array_equal(pixels(result), pixels(expected))


def test_the_seed_decides_the_result(pipe, image):
    first, again = pipe.edit(image, PROMPT, FAST), pipe.edit(image, PROMPT, FAST)
    other = pipe.edit(image, PROMPT, EditOptions(steps=3, size_level=64, seed=8))
    np.testing.assert_array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_the_v12_size_level_default_is_1024():
    assert EditOptions().level("v1.2") == 1024 and EditOptions().level("v1.1") == 512
    assert EditOptions(size_level=64).level("v1.2") == 64


def test_without_restore_size_the_result_stays_at_the_working_size(pipe, image):
    out = pipe.edit(image, PROMPT, EditOptions(steps=2, size_level=64, seed=7, restore_size=False))
    assert out.size == v12.working_size(image, 64)


def test_an_init_image_at_strength_1_changes_nothing(pipe, image):
    with_init = pipe.edit(image, PROMPT, replace(FAST, init_image=seeded_image(50, 40, seed=11)))
    np.testing.assert_array_equal(pixels(with_init), pixels(pipe.edit(image, PROMPT, FAST)))


def test_below_strength_1_the_init_image_is_the_start_point(pipe, image):
    half = replace(FAST, strength=0.5)
    with_init = pipe.edit(image, PROMPT, replace(half, init_image=seeded_image(50, 40, seed=11)))
    assert not np.array_equal(pixels(with_init), pixels(pipe.edit(image, PROMPT, half)))


def decoded_init(pipe, init: Image.Image, work, original, generator) -> Image.Image:
    """The init image's latent, sampled with the generator's next draw, decoded as a v1.2 result."""
    latent = reference_latent(pipe.vae, v12.vae_input(init, work), generator)
    return v12.restore_size(v12.to_uint8(v12.decode(pipe.vae, latent))[0], original)


def test_strength_0_returns_the_init_image_sampled_after_the_reference_and_the_noise(pipe, image):
    init = seeded_image(50, 40, seed=11)
    out = pipe.edit(image, PROMPT, replace(FAST, strength=0.0, init_image=init))
    work, generator = v12.working_size(image, 64), torch.Generator().manual_seed(7)
    reference_latent(pipe.vae, v12.vae_input(image, work), generator)  # the reference's draw
    v12.initial_noise(work, generator, torch.float32)  # the noise's
    np.testing.assert_array_equal(pixels(out), pixels(decoded_init(pipe, init, work, image.size, generator)))


def test_v12_text_to_image_starts_from_an_init_image_below_strength_1(pipe):
    init = seeded_image(50, 40, seed=11)
    out = pipe.text_to_image("a lighthouse", 64, 48, replace(FAST, strength=0.0, init_image=init))
    generator = torch.Generator().manual_seed(7)
    v12.initial_noise((64, 48), generator, torch.float32)  # the noise's draw
    np.testing.assert_array_equal(pixels(out), pixels(decoded_init(pipe, init, (64, 48), (64, 48), generator)))
    plain = pipe.text_to_image("a lighthouse", 64, 48, FAST)
    half = pipe.text_to_image("a lighthouse", 64, 48, replace(FAST, strength=0.5))
    np.testing.assert_array_equal(pixels(half), pixels(plain))  # nothing to start from: sampled in full


def test_regione_reaches_the_v12_sampler(pipe, image):
    options = EditOptions(steps=10, size_level=64, seed=7, regione=RegionEConfig())
    cond, uncond = pipe.encoder.encode_pair_v12(resize_to_size_level(image, 64), PROMPT)
    expected = v12.edit(pipe.dit, pipe.vae, image, cond, uncond,
                        v12.V12Options(steps=10, size_level=64, seed=7, regione=RegionEConfig()), dtype=torch.float32)
    result = pipe.edit(image, PROMPT, options)
    np.testing.assert_array_equal(pixels(result), pixels(expected))
    assert not np.array_equal(pixels(result), pixels(pipe.edit(image, PROMPT, replace(options, regione=None))))


def test_reference_noise_belongs_to_v11_and_is_refused_for_v12(pipe, image):
    with pytest.raises(ValueError, match="leave reference_noise out"):
        pipe.edit(image, PROMPT, FAST, reference_noise=torch.zeros(1, 16, 6, 10))


def test_a_quoted_placeholder_is_refused_before_the_v12_encoder_runs(pipe, image, monkeypatch):
    monkeypatch.setattr(ModuleStages, "encode", lambda *args: pytest.fail("the encoder ran"))
    with pytest.raises(ValueError, match="even in quotes"):
        pipe.edit(image, 'write "<|image_pad|>" on the wall', FAST)


def test_text_to_image_uses_the_v12_negative_prompt_and_a_black_square(pipe, monkeypatch):
    seen = []
    encode = ModuleStages.encode

    def spy(self, image, prompts):
        seen.append((image.size, image.getextrema(), prompts))
        return encode(self, image, prompts)

    monkeypatch.setattr(ModuleStages, "encode", spy)
    out = pipe.text_to_image("a lighthouse", 64, 48, EditOptions(steps=2, size_level=64, seed=1))
    assert out.size == (64, 48)
    (size, extrema, prompts), = seen
    assert size == (64, 64) and extrema == ((0, 0), (0, 0), (0, 0))
    assert prompts[0] == "a lighthouse" and prompts[1].startswith("worst quality")


def test_an_instruction_over_2048_tokens_is_cut_as_the_reference_does_and_said(pipe, image, caplog):
    with caplog.at_level(logging.WARNING):
        out = pipe.edit(image, "purple " * 2100, EditOptions(steps=1, size_level=64, seed=7))
    assert out.size == image.size
    assert any("the DiT gets the first 2048" in r.getMessage() and "image tokens" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------------------------- reasoning


def test_thinking_and_reflection_run_the_reference_loop(pipe, image):
    script = ScriptedGenerator(EXAMPLE_SCRIPT)
    result = pipe.reason_edit(image, PROMPT, FAST, ReasoningOptions(max_tries=3), generate=script)
    assert [c.kind for c in result.calls] == [M.THINK] + [M.DESCRIBE, M.EVALUATE, M.REFLECT, M.SCORE1, M.SCORE2] * 2
    assert result.reformat_prompt == EXAMPLE_SCRIPT["think_reformat"][0]
    first, second = result.tries
    assert first.source is None and first.instruction == result.reformat_prompt
    assert second.source == 0 and second.instruction == " Make the rest of the sky purple."
    assert result.best_index == 1 and result.success
    assert all(t.image.size == image.size for t in result.tries)
    reference, edited = script.calls[-2].images  # score1 of try 2: the original and try 2's result
    assert pixels(reference).tobytes() == pixels(image).tobytes()
    np.testing.assert_array_equal(pixels(edited), pixels(second.image))


def test_the_first_try_is_the_plain_edit_and_the_generator_carries_on(pipe, image):
    script = ScriptedGenerator({**EXAMPLE_SCRIPT, "reflection": ["<#Think> no.<#Failed>", "<#Think> ok.<#Success>"]})
    result = pipe.reason_edit(image, PROMPT, FAST, ReasoningOptions(think=False), generate=script)
    assert len(result.tries) == 2 and result.tries[1].source is None and result.tries[1].instruction == PROMPT
    np.testing.assert_array_equal(pixels(result.tries[0].image), pixels(pipe.edit(image, PROMPT, FAST)))
    assert not np.array_equal(pixels(result.tries[1].image), pixels(result.tries[0].image))


def test_thinking_alone_edits_once_with_the_rewritten_instruction(pipe, image):
    script = ScriptedGenerator({M.THINK: ["Paint the sky purple."]})
    result = pipe.reason_edit(image, PROMPT, FAST, ReasoningOptions(reflect=False), generate=script)
    assert len(result.tries) == 1 and len(result.calls) == 1
    np.testing.assert_array_equal(pixels(result.best_image), pixels(pipe.edit(image, "Paint the sky purple.", FAST)))


def test_a_reply_that_never_closes_its_tags_is_asked_again_then_the_try_counts_as_failed(pipe, image):
    script = ScriptedGenerator({**EXAMPLE_SCRIPT, "reflection": ["<#Think> The sky is still"]})
    result = pipe.reason_edit(image, PROMPT, EditOptions(steps=1, size_level=64, seed=7),
                              ReasoningOptions(think=False, max_tries=2), generate=script)
    assert result.calls_per_try() == [1 + 1 + 20 + 1 + 1] * 2
    assert all(t.reflection.reflection == FAILED_REFLECTION and t.reflection.verdict == "failed"
               for t in result.tries)
    assert [t.source for t in result.tries] == [None, None]


def test_the_tiny_text_encoder_writes_a_real_reply(pipe, image):
    tokens = []
    result = pipe.reason_edit(image, PROMPT, EditOptions(steps=1, size_level=64, seed=7),
                              ReasoningOptions(reflect=False, max_new_tokens=3),
                              on_token=lambda done, total: tokens.append((done, total)))
    assert len(result.calls) == 1 and tokens[-1] == (3, 3)


def test_the_same_seed_gives_the_same_real_reply(pipe, image):
    options = EditOptions(steps=1, size_level=64, seed=7)
    reasoning = ReasoningOptions(reflect=False, max_new_tokens=3, seed=11)
    first = pipe.reason_edit(image, PROMPT, options, reasoning).calls
    assert pipe.reason_edit(image, PROMPT, options, reasoning).calls == first


def test_reflection_with_max_tries_0_is_refused_before_anything_runs(pipe, image):
    script = ScriptedGenerator(EXAMPLE_SCRIPT)
    with pytest.raises(ValueError, match="max_tries must be at least 1"):
        pipe.reason_edit(image, PROMPT, FAST, ReasoningOptions(max_tries=0), generate=script)
    assert script.calls == []


def test_an_encoder_without_its_lm_head_is_refused_with_the_fix(tiny_v12_folder, image):
    plain = Step1XPipeline.from_folder(tiny_v12_folder, device="cpu", compute_dtype=torch.float32)
    with pytest.raises(CannotGenerateError, match="generation on.*generation=True"):
        plain.reason_edit(image, PROMPT, FAST)
    assert plain.edit(image, PROMPT, FAST).size == image.size


def test_reasoning_on_a_v11_dit_is_refused(tiny_models, image):
    v11 = Step1XPipeline.from_folder(tiny_models, device="cpu", compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="v1.2 features, but the DiT is v1.1"):
        v11.reason_edit(image, PROMPT, FAST, generate=ScriptedGenerator(EXAMPLE_SCRIPT))


# -------------------------------------------------------------------------------------------- offloading


class Model:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def to(self, device):
        self.log.append((self.name, str(device)))
        return self


def test_offloading_never_puts_the_dit_and_the_encoder_on_the_device_together():
    log = []
    stages = ModuleStages(Model("dit", log), Model("vae", log), Model("encoder", log), device=torch.device("cuda"),
                          dtype=torch.float32, offload=True)
    where = {}
    for name in ("encoder", "encoder", "vae", "dit", "vae", "encoder", "encoder", "vae", "dit"):
        stages.place(name)
        for model, device in log:
            where[model] = device
        assert not (where.get("dit") == "cuda" and where.get("encoder") == "cuda"), log
    moves = [entry for entry in log if entry[0] == "encoder"]
    assert moves == [("encoder", "cuda"), ("encoder", "cpu"), ("encoder", "cuda"), ("encoder", "cpu")]
    stages.release()
    assert all(device == "cpu" for device in {**where, **dict(log)}.values())


def test_an_encoder_on_a_device_of_its_own_is_never_moved():
    log = []
    stages = ModuleStages(Model("dit", log), Model("vae", log), Model("encoder", log), device=torch.device("cuda"),
                          dtype=torch.float32, offload=True, offload_encoder=False)
    for name in ("encoder", "dit", "encoder"):
        stages.place(name)
    stages.release()
    assert all(model != "encoder" for model, _ in log)


def test_an_offloaded_pipeline_gives_the_same_reasoning_edit(tiny_v12_folder, pipe, image):
    offloaded = Step1XPipeline.from_folder(tiny_v12_folder, device="cpu", compute_dtype=torch.float32, offload=True,
                                           generation=True)
    a = offloaded.reason_edit(image, PROMPT, FAST, generate=ScriptedGenerator(EXAMPLE_SCRIPT))
    b = pipe.reason_edit(image, PROMPT, FAST, generate=ScriptedGenerator(EXAMPLE_SCRIPT))
    for x, y in zip(a.images, b.images, strict=True):
        np.testing.assert_array_equal(pixels(x), pixels(y))


# ------------------------------------------------------------------------------------- v1.1 diffusers layout


def test_the_v11_diffusers_folder_edits_as_the_official_single_files(tiny_v11_diffusers_folder, tiny_models, image):
    folder = Step1XPipeline.from_folder(tiny_v11_diffusers_folder, device="cpu", compute_dtype=torch.float32)
    official = Step1XPipeline.from_folder(tiny_models, device="cpu", compute_dtype=torch.float32)
    assert folder.version == official.version == "v1.1"
    assert folder.encoder.source == tiny_v11_diffusers_folder / "text_encoder"
    options = EditOptions(steps=2, size_level=64, seed=3)
    np.testing.assert_array_equal(pixels(folder.edit(image, PROMPT, options)),
                                  pixels(official.edit(image, PROMPT, options)))
