"""The reply parsers reproduce the v1.2 reference on its 29 recorded sample replies, plus the quirks they keep."""

from __future__ import annotations

import json

import pytest

from step1x.reasoning.parsers import (
    MISSING_THINK,
    REPEATED_TAG,
    TAG_BEFORE_THINK,
    TAG_COUNT,
    analyze_text,
    apply_score_caps,
    check_reflection,
    is_error_reply,
    is_well_formed,
    parse_json_block,
    parse_score_reply,
    read_verdict,
    score_floor,
)

REFERENCE_PROBLEMS = {
    "错误: 缺少 <#Think>": MISSING_THINK,
    "错误: 需要且仅需要": TAG_COUNT,
    "错误: 标签 ": REPEATED_TAG,
    "错误: 反思/失败/成功标签必须出现在 <#Think> 之后": TAG_BEFORE_THINK,
}
"""The reference's (Chinese) rejection messages -> this pack's problem codes."""

REFERENCE_CAPS = {
    "cap<=2: 未满足指令关键要求": "cap<=2: instruction not met",
    "cap<=5: 仅部分满足指令": "cap<=5: instruction partly met",
    "cap<=5: 多个明显矛盾": "cap<=5: several major conflicts",
    "cap<=8: 存在1个明显矛盾": "cap<=8: one major conflict",
    "cap<9: 存在明显差异/问题": "cap<9: visible differences or problems",
}


def reference_cap(entry: str) -> str:
    if entry.startswith("cap<=7: "):
        return "cap<=7: " + entry[8:].replace("幻觉x", "hallucinations x").replace("遗漏x", "omissions x")
    return REFERENCE_CAPS[entry]


@pytest.fixture(scope="module")
def samples(v12_dir) -> list[dict]:
    return json.loads((v12_dir / "thinker_v12.json").read_text(encoding="utf-8"))["parser_samples"]


def test_all_samples_are_present(samples):
    assert len(samples) == 29


def test_language_word(samples):
    for sample in samples:
        assert analyze_text(sample["text"]) == sample["analyze_text"], sample["name"]


def test_error_prefix(samples):
    for sample in samples:
        assert is_error_reply(sample["text"]) == sample["startswith_error_prefix"], sample["name"]


def test_reflection_step_acceptance(samples):
    for sample in samples:
        expected = sample["validate_reflection_response"]
        check = check_reflection(sample["text"])
        assert check.valid == expected["valid"], sample["name"]
        assert sample["would_reflection_step_accept_it"].startswith("yes" if check.valid else "no"), sample["name"]
        if check.valid:
            assert check.text == expected["cleaned_or_error"], sample["name"]
        else:
            prefix = next(p for p in REFERENCE_PROBLEMS if expected["cleaned_or_error"].startswith(p))
            assert check.problem == REFERENCE_PROBLEMS[prefix], sample["name"]


def test_format_check_and_verdict(samples):
    for sample in samples:
        assert is_well_formed(sample["text"]) == sample["validate_string"], sample["name"]
        verdict = read_verdict(sample["text"])
        assert verdict.success == sample["format_text"]["success"], sample["name"]
        assert verdict.refine_prompt == sample["format_text"]["refine_prompt"], sample["name"]


def test_loop_decision(samples):
    for sample in samples:
        verdict = read_verdict(sample["text"])
        decision = sample["loop_decision_if_this_were_the_reflection"]
        if verdict.success:
            assert decision.startswith("accept: stop the loop"), sample["name"]
        elif verdict.refine_prompt is not None:
            assert decision.startswith("retry: edit the PREVIOUS OUTPUT"), sample["name"]
        else:
            assert "retry from the ORIGINAL image" in decision, sample["name"]


def test_json_block(samples):
    for sample in samples:
        assert parse_json_block(sample["text"]) == sample["parse_json_block"], sample["name"]


def test_score_caps(samples):
    checked = 0
    for sample in samples:
        obj = parse_json_block(sample["text"])
        expected = sample["score_caps"]
        caps = apply_score_caps(obj) if obj is not None else None
        if expected is None:
            assert caps is None, sample["name"]
            continue
        checked += 1
        assert {k: v for k, v in caps.items() if k != "cap_trace"} == {
            k: v for k, v in expected.items() if k != "cap_trace"
        }, sample["name"]
        assert caps["cap_trace"] == [reference_cap(entry) for entry in expected["cap_trace"]], sample["name"]
    assert checked == 8


def test_score_reply(samples):
    for sample in samples:
        expected = sample["validate_score_response"]
        parsed = parse_score_reply(sample["text"])
        assert (parsed is not None) == expected["valid"], sample["name"]
        if expected["valid"]:
            assert parsed == expected["content"], sample["name"]


def test_fraction_scores_are_read_as_tenths():
    caps = apply_score_caps({"meets_instruction": "yes", "raw_score": 0.93})
    assert caps["raw_score"] == pytest.approx(9.3) and caps["score"] == pytest.approx(9.3)
    assert apply_score_caps({"meets_instruction": "yes", "raw_score": 1})["score"] == 10.0
    assert apply_score_caps({"meets_instruction": "yes", "raw_score": 42})["score"] == 10.0


def test_every_problem_caps_below_nine():
    caps = apply_score_caps({"meets_instruction": "yes", "hallucinations": 1, "raw_score": 9.8})
    assert caps["score"] == 7.0
    assert caps["cap_trace"] == ["cap<=7: hallucinations x1", "cap<9: visible differences or problems"]
    assert apply_score_caps({"meets_instruction": "no", "raw_score": 9})["score"] == 2.0
    assert apply_score_caps({"meets_instruction": "yes", "major_conflicts": 3, "raw_score": 9})["score"] == 5.0


def test_fence_is_cut_by_fixed_offsets():
    fenced = '```json\n{"score": [7, 6], "reasoning": "ok"}\n```'
    assert parse_score_reply(fenced) == {"score": [7, 6], "reasoning": "ok"}
    assert parse_score_reply(fenced + " thanks") is None


def test_tags_that_never_close_are_rejected():
    assert not check_reflection("<#Think> The sky is only partly").valid
    assert read_verdict("<#Think> The sky is only partly") == read_verdict("<#Think> x<#Failed>")


def test_score_floor_treats_unusable_lists_as_zero():
    assert score_floor({"score": [9, 7]}) == 7.0
    assert score_floor({"score": ["8", 9.5]}) == 8.0
    assert score_floor({"score": []}) == 0.0
    assert score_floor({"score": [8, "good"]}) == 0.0
    assert score_floor({"score": [8, None]}) == 0.0
