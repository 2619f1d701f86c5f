"""What the README promises about installing and about the self-test holds."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def ci_block(tag: str) -> str:
    """The command in a README block marked ``<!-- ci:TAG -->``, read as ``.ci/run`` reads it."""
    script = (
        f'awk -v tag="<!-- ci:{tag} -->" \'$0 == tag {{ want = 1; next }} '
        "want && /^```/ { if (inside) exit; inside = 1; next } inside { print }' README.md"
    )
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_the_readme_says_which_torch_build_the_install_command_gets_and_shows_the_cpu_alternative():
    install = ci_block("install")
    assert re.search(r"pip install torch==[\d.]+ ", install)
    text = " ".join(README.split())
    assert "on a default Linux setup `pip install torch==2.13.0` downloads the CUDA build" in text
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text


def test_the_selftest_time_is_a_measurement_with_its_machine():
    assert "a few seconds" not in README and "about 5 s end to end" not in README
    assert re.search(r"`time python -m step1x selftest` measured \d+ s.* of wall time .* on a 2-core CPU machine",
                     " ".join(README.split()))


def test_the_tests_need_no_fixtures_outside_the_repository():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "shared/fixtures" not in ci and "STEP1X_FIXTURES" not in ci
    assert "STEP1X_QWEN_TOKENIZER" in ci
    assert "tests/fixtures/" in README
