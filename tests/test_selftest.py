"""``step1x selftest`` passes offline on the CPU and writes an image; its stand-in tokenizer reproduces
the real Qwen2.5 tokenisation of the prompt template."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from step1x.checkpoints import model_files
from step1x.encoder.template import VISION_START, chat_text
from step1x.encoder.tokens import VISION_START_ID, load_tokenizer, prompt_ids
from step1x.selftest import TOKENIZER_ENV, find_tokenizer, run_selftest
from step1x.tiny_tokenizer import write_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_selftest_command_passes_on_a_fresh_machine_and_writes_an_image(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != TOKENIZER_ENV}
    env.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "selftest.png"
    proc = subprocess.run([sys.executable, "-m", "step1x", "selftest", "--output", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stand-in built at run time" in proc.stdout
    assert "selftest passed" in proc.stdout
    for stage in ("build", "load", "encode", "sample", "decode", "total"):
        assert f"{stage}:" in proc.stdout
    with Image.open(out) as image:
        assert image.size == (96, 64)


def test_selftest_with_the_real_tokenizer_passes(qwen_tokenizer_dir, tmp_path):
    result = run_selftest(tokenizer=qwen_tokenizer_dir, keep=tmp_path, say=lambda _: None)
    assert result.ok, result.error
    assert "--tokenizer" in result.tokenizer
    assert result.image.is_file()


def test_a_broken_tokenizer_folder_fails_with_the_reason_and_cleans_up(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text("{}")
    before = set(Path(tempfile.gettempdir()).glob("step1x-selftest-*"))
    result = run_selftest(tokenizer=tmp_path / "tok", say=lambda _: None)
    assert set(Path(tempfile.gettempdir()).glob("step1x-selftest-*")) == before
    assert not result.ok
    assert "selftest FAILED" in result.report()
    assert f"no Qwen2.5 tokenizer in {tmp_path / 'tok'}" in result.error


def test_the_stand_in_tokenizer_reproduces_the_template_layout(tmp_path):
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path))
    ids = prompt_ids(tokenizer, 'write "OK" on the “wall”', 4)
    assert ids[218] == VISION_START_ID
    assert tokenizer.convert_ids_to_tokens(ids[217]) == ":"


def test_the_stand_in_tokenizer_splits_the_template_like_qwen(qwen_tokenizer_dir, tmp_path):
    real = load_tokenizer(qwen_tokenizer_dir)
    stand_in = load_tokenizer(write_tiny_tokenizer(tmp_path))
    text = chat_text("make the sky purple")
    head = text[: text.index(VISION_START)]
    tokens = [t.convert_ids_to_tokens(t(head, add_special_tokens=False)["input_ids"]) for t in (real, stand_in)]
    assert tokens[0] == tokens[1]
    for instruction in ("make the sky purple", 'add the word "HELLO"', "change “cat” to 'dog'"):
        a, b = (prompt_ids(t, instruction, 6) for t in (real, stand_in))
        assert real.decode(a) == stand_in.decode(b)


def test_the_tokenizer_is_looked_for_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(model_files, "comfy_tokenizer", lambda folder: tmp_path / "bundled")
    monkeypatch.setenv(TOKENIZER_ENV, str(tmp_path / "env"))
    assert find_tokenizer(tmp_path / "given")[0] == tmp_path / "given"
    assert find_tokenizer()[0] == tmp_path / "env"
    monkeypatch.delenv(TOKENIZER_ENV)
    assert find_tokenizer() == (tmp_path / "bundled", f"{tmp_path / 'bundled'} (ComfyUI's bundled Qwen2.5 tokenizer)")
    monkeypatch.setattr(model_files, "comfy_tokenizer", lambda folder: None)
    assert find_tokenizer()[0] is None


def test_selftest_reports_timings_and_memory(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(model_files, "comfy_tokenizer", lambda folder: None)
    result = run_selftest(output=tmp_path / "x.png", say=lambda _: None)
    assert result.ok, result.error
    assert set(result.timings) == {"build", "load", "encode", "sample", "decode", "total"}
    assert "CPU peak RSS" in result.peak_memory
    assert (tmp_path / "x.png").is_file()
