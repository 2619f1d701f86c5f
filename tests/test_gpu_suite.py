"""The GPU speed suite runs end to end on a tiny model on the CPU (so it still works the day a GPU is lent): every
mode, both model versions, a table row each with figures, none failed."""

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def gpu_suite(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("gpu_suite")
    yield module
    for name in ("gpu_suite", "bench_regione", "bench_dit"):
        sys.modules.pop(name, None)


def test_every_mode_of_both_versions_runs_on_a_tiny_model(gpu_suite, tmp_path):
    out = tmp_path / "suite.md"
    gpu_suite.main(["--device", "cpu", "--tiny", "--sizes", "64", "--steps", "3", "--attention", "sdpa",
                    "--compile-backend", "eager", "--out", str(out)])
    rows = [line.split(" | ") for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("| v1.")]
    assert [(r[0], r[3]) for r in rows] == [(f"| {v}", m) for v in ("v1.1", "v1.2") for m in
                                           ("bf16", "compile", "teacache", "regione", "fp8-storage", "fp8-matmul")]
    for row in rows:
        assert float(row[4]) > 0 and float(row[5]) > 0, row  # s/step, s/edit: figures, not an error


def test_an_unknown_mode_is_refused(gpu_suite):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--device", "cpu", "--tiny", "--modes", "bf16,turbo"])
