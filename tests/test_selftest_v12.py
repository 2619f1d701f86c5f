"""``step1x selftest --version v1.2`` passes offline: a tiny v1.2 model folder in the diffusers layout, a plain
edit, thinking + reflection with scripted replies, and a real reply of the tiny text encoder; the folder it keeps
is one ``edit --models`` reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from step1x.checkpoints.model_files import resolve_models
from step1x.selftest import TOKENIZER_ENV, run_selftest

REPO = Path(__file__).resolve().parents[1]


def test_the_v12_selftest_command_passes_on_a_fresh_machine(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != TOKENIZER_ENV}
    env.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "selftest.png"
    proc = subprocess.run([sys.executable, "-m", "step1x", "selftest", "--version", "v1.2", "--output", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "built tiny v1.2 models" in proc.stdout and "selftest passed" in proc.stdout
    assert "reasoning edit: 2 tries, 11 scripted replies, best try 2" in proc.stdout
    assert "the tiny text encoder generated 4 tokens" in proc.stdout and "reason:" in proc.stdout
    with Image.open(out) as image:
        assert image.size == (96, 64)


def test_the_kept_v12_folder_is_what_edit_reads(qwen_tokenizer_dir, tmp_path):
    result = run_selftest(tokenizer=qwen_tokenizer_dir, keep=tmp_path, version="v1.2", say=lambda _: None)
    assert result.ok, result.error
    paths = resolve_models(tmp_path / "models")
    assert paths.dit == paths.mllm == tmp_path / "models" / "Step1X-Edit-v1p2"
