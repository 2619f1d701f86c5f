"""The think → edit → reflect → retry loop reproduces the reference's 8 recorded runs (scripted model replies,
a stand-in editor), and handles what the reference crashes on."""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

from reasoning_support import ScriptedModel, thinker_record
from step1x.reasoning import ReasoningCancelled, Thinker, pick_best, reason_edit
from step1x.reasoning import messages as M
from step1x.reasoning import prompts as P
from step1x.reasoning.thinker import ReflectResult

INSTRUCTION = "Make the sky purple."
OK_EVALUATION = (
    '{"meets_instruction": "yes", "major_conflicts": 0, "minor_conflicts": 0, "omissions": 0, "raw_score": 9, '
    '"reason": "ok"}'
)


class RecordingEditor:
    """Stands in for the DiT edit: returns a new image of the input's size and remembers what it was given."""

    def __init__(self):
        self.inputs: list[tuple[Image.Image, str, int]] = []
        self.outputs: list[Image.Image] = []

    def __call__(self, image: Image.Image, instruction: str, try_index: int) -> Image.Image:
        self.inputs.append((image, instruction, try_index))
        out = Image.new("RGB", image.size, (try_index * 40, 0, 0))
        self.outputs.append(out)
        return out


def run_scenario(scenario: dict):
    flags = scenario["flags"]
    model = ScriptedModel(scenario["script"])
    editor = RecordingEditor()
    original = Image.new("RGB", (96, 64), (0, 0, 200))
    result = reason_edit(
        original,
        INSTRUCTION,
        editor,
        Thinker(model),
        think=flags["enable_thinking_mode"],
        reflect=flags["enable_reflection_mode"],
        max_tries=flags["max_try_cnt"],
    )
    return result, model, editor, original


@pytest.fixture(scope="module")
def scenarios(v12_dir) -> dict[str, dict]:
    return {s["name"]: s for s in thinker_record(v12_dir)["loop_scenarios"]}


def test_all_scenarios_are_present(scenarios):
    assert len(scenarios) == 8


def test_generate_calls(scenarios):
    for name, scenario in scenarios.items():
        result, model, _, _ = run_scenario(scenario)
        made = [{"call": call.kind, "response": reply} for call, reply in zip(model.calls, model.replies, strict=True)]
        assert made == scenario["generate_calls"], name
        assert dict(Counter(call.kind for call in model.calls)) == scenario["generate_call_counts"], name
        assert [c.kind for c in result.calls] == [c["call"] for c in scenario["generate_calls"]], name


def test_each_try_edits_the_recorded_image_with_the_recorded_prompt(scenarios):
    for name, scenario in scenarios.items():
        result, _, editor, original = run_scenario(scenario)
        assert len(editor.inputs) == scenario["num_denoise_runs"], name
        for index, (expected, (image, prompt, try_index)) in enumerate(
            zip(scenario["tries"], editor.inputs, strict=True)
        ):
            source = expected["encode_image_input"]
            wanted = original if source == "original" else editor.outputs[int(source.removeprefix("output_of_try"))]
            assert image is wanted, (name, index)
            assert list(image.size) == expected["input_wh"], (name, index)
            assert prompt == expected["encode_prompt_prompts"][0], (name, index)
            assert try_index == index
            assert result.tries[index].source == (None if source == "original" else int(source[-1])), (name, index)


def test_outputs(scenarios):
    for name, scenario in scenarios.items():
        result, _, editor, _ = run_scenario(scenario)
        expected = scenario["output"]
        assert result.reformat_prompt == expected["reformat_prompt"], name
        assert result.think_info == expected["think_info"], name
        assert result.best_info == expected["best_info"], name
        assert result.images == [editor.outputs[i] for i in expected["images_try_index"]], name
        assert [result.best_index] == expected["final_images_try_index"], name
        assert result.best_image is editor.outputs[result.best_index], name


def test_each_call_sees_the_right_images(scenarios):
    result, model, editor, original = run_scenario(scenarios["think_on_reflect_on__reflection_then_success"])
    outputs = iter(editor.outputs)
    edited = None
    for call in model.calls:
        if call.kind == M.DESCRIBE:
            edited = next(outputs)
        expected = {
            M.THINK: [original],
            M.DESCRIBE: [original],
            M.EVALUATE: [edited],
            M.REFLECT: [original, edited],
            M.SCORE1: [original, edited],
            M.SCORE2: [edited],
        }[call.kind]
        assert all(a is b for a, b in zip(call.images, expected, strict=True)), call.kind


def test_reflection_judges_the_first_prompt_not_the_refine_prompt(scenarios):
    _, model, _, _ = run_scenario(scenarios["think_on_reflect_on__reflection_then_success"])
    reflect_calls = [call for call in model.calls if call.kind == M.REFLECT]
    assert len(reflect_calls) == 2
    for call in reflect_calls:
        assert "The current edit instruction is: \n            Change the sky color to purple.\n" in call.user_text


def test_calls_per_try(scenarios):
    result, _, _, _ = run_scenario(scenarios["think_off_reflect_on__failed_x3_best_by_score"])
    assert result.calls_per_try() == [5, 5, 5]
    result, _, _, _ = run_scenario(scenarios["reflect_on__degenerate_model_output"])
    assert result.calls_per_try() == [61, 61]
    assert len(result.calls) == 122


def test_max_tries_zero_is_a_clear_error():
    with pytest.raises(ValueError, match="max_tries must be at least 1"):
        reason_edit(Image.new("RGB", (8, 8)), INSTRUCTION, RecordingEditor(), Thinker(ScriptedModel({})), max_tries=0)


def test_reflection_needs_a_thinker():
    with pytest.raises(ValueError, match="need a Thinker"):
        reason_edit(Image.new("RGB", (8, 8)), INSTRUCTION, RecordingEditor(), None, reflect=True)


def test_plain_edit_needs_no_model():
    editor = RecordingEditor()
    result = reason_edit(Image.new("RGB", (8, 8)), INSTRUCTION, editor, None, think=False, reflect=False)
    assert result.images == editor.outputs and result.best_index == 0
    assert result.think_info is None and result.best_info is None and result.calls == []


def test_reply_that_never_closes_its_tags_falls_back_to_failed():
    model = ScriptedModel({
        M.DESCRIBE: ["desc"],
        M.EVALUATE: [OK_EVALUATION],
        M.REFLECT: ["<#Think> The sky is only partly"],
        M.SCORE1: ['{"score": [5, 5], "reasoning": "a"}'],
        M.SCORE2: ['{"score": [5, 5], "reasoning": "a"}'],
    })
    editor = RecordingEditor()
    original = Image.new("RGB", (16, 16))
    result = reason_edit(original, INSTRUCTION, editor, Thinker(model), max_tries=2)
    assert result.think_info == [P.FAILED_REFLECTION, P.FAILED_REFLECTION]
    assert [t.reflection.verdict for t in result.tries] == ["failed", "failed"]
    assert result.calls_per_try() == [1 + 1 + 20 + 1 + 1] * 2
    assert editor.inputs[1][0] is original


def test_empty_score_list_counts_as_zero_instead_of_crashing():
    model = ScriptedModel({
        M.DESCRIBE: ["desc"],
        M.EVALUATE: [OK_EVALUATION],
        M.REFLECT: ["<#Think> no<#Failed>"],
        M.SCORE1: ['{"score": [4, 4], "reasoning": "a"}', '{"score": [], "reasoning": "b"}'],
        M.SCORE2: ['{"score": [5, 5], "reasoning": "a"}'],
    })
    result = reason_edit(Image.new("RGB", (16, 16)), INSTRUCTION, RecordingEditor(), Thinker(model), max_tries=2)
    assert [t.reflection.score for t in result.tries] == [20.0, 0.0]
    assert result.best_index == 0


def test_unusable_rewrite_keeps_the_original_instruction():
    for reply in ["错误: upstream failed", ""]:
        editor = RecordingEditor()
        model = ScriptedModel({M.THINK: [reply]})
        result = reason_edit(Image.new("RGB", (8, 8)), INSTRUCTION, editor, Thinker(model), think=True, reflect=False)
        assert result.reformat_prompt == INSTRUCTION and not result.think.rewritten
        assert editor.inputs[0][1] == INSTRUCTION


def test_cancel_between_stages():
    model = ScriptedModel({M.THINK: ["Change the sky color to purple."]})
    editor = RecordingEditor()
    with pytest.raises(ReasoningCancelled, match="before reflect"):
        reason_edit(
            Image.new("RGB", (8, 8)), INSTRUCTION, editor, Thinker(model), think=True,
            should_stop=lambda: len(editor.inputs) > 0,
        )
    assert len(editor.inputs) == 1 and [c.kind for c in model.calls] == [M.THINK]


def test_stage_progress():
    stages = []
    model = ScriptedModel({M.THINK: ["x"]})
    reason_edit(Image.new("RGB", (8, 8)), INSTRUCTION, RecordingEditor(), Thinker(model), think=True, reflect=False,
                on_stage=lambda stage, index: stages.append((stage, index)))
    assert stages == [("think", 0), ("edit", 0)]


def test_edit_must_return_an_image():
    with pytest.raises(TypeError, match="must return a PIL image"):
        reason_edit(Image.new("RGB", (8, 8)), INSTRUCTION, lambda image, prompt, i: None, None, reflect=False)


def _judged(reflection: str, score1: list, score2: list) -> ReflectResult:
    return ReflectResult(reflection, False, None, {"score": score1}, {"score": score2}, None, None, ())


def test_best_image_rule():
    success, failed = "<#Think> a<#Success>", "<#Think> a<#Failed>"
    assert pick_best([_judged(failed, [5, 9], [9]), _judged(failed, [8, 7], [9]), _judged(failed, [4], [9])]) == 1
    assert pick_best([_judged(failed, [7], [7]), _judged(success, [7], [7]), _judged(failed, [7], [7])]) == 1
    assert pick_best([_judged(failed, [7], [7]), _judged(failed, [7], [7])]) == 1
    assert pick_best([_judged(success, [7], [7]), _judged(success, [7], [7])]) == 1
    assert pick_best([_judged(failed, [0], [0]), _judged(failed, [], [3])]) == 1


def test_reasoning_text_tells_the_story(scenarios):
    result, _, _, _ = run_scenario(scenarios["think_on_reflect_on__reflection_then_success"])
    text = result.reasoning_text()
    assert "Rewritten instruction: Change the sky color to purple." in text
    assert "Try 2: edited the output of try 1 with ' Make the remaining blue sky purple.'" in text
    assert "Reflection (success): <#Think> Done.<#Success>" in text
    assert "Best: try 2 of 2." in text
