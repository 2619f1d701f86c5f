"""The batch runner: Ctrl-C ends the run cleanly with a report, and errors read as advice."""

from __future__ import annotations

import pytest
import torch

from helpers import seeded_image
from step1x import batch
from step1x.batch import describe_error, run_batch
from step1x.jobs import edit_jobs
from step1x.pipeline import EditOptions, Step1XPipeline


@pytest.fixture()
def pipe(tiny_models):
    return Step1XPipeline.from_folder(tiny_models, device="cpu", compute_dtype=torch.float32)


def test_ctrl_c_stops_the_run_and_reports_what_was_done(pipe, tmp_path, monkeypatch):
    for name in ("a.png", "b.png", "c.png"):
        seeded_image(32, 32).save(tmp_path / name)
    jobs = edit_jobs(tmp_path, {"a.png": "x", "b.png": "y", "c.png": "z"}, tmp_path / "out")
    real_run_job = batch.run_job

    def interrupt_on_b(pipe, job, *args, **kwargs):
        if job.name == "b.png":
            raise KeyboardInterrupt
        return real_run_job(pipe, job, *args, **kwargs)

    monkeypatch.setattr(batch, "run_job", interrupt_on_b)
    report = run_batch(pipe, jobs, EditOptions(steps=1, size_level=32), progress=False)
    assert report.interrupted and not report.ok
    assert [r.job.name for r in report.results] == ["a.png"]
    assert "done 1, failed 0" in report.summary() and "interrupted" in report.summary()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


def test_the_per_step_progress_sees_every_step(pipe, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(batch._Bars, "step", lambda self, info: seen.append((info.step, info.total)))
    seeded_image(32, 32).save(tmp_path / "a.png")
    report = run_batch(pipe, edit_jobs(tmp_path, {"a.png": "x"}, tmp_path / "out"),
                       EditOptions(steps=3, size_level=32), progress=False)
    assert report.ok
    assert seen == [(0, 3), (1, 3), (2, 3)]
    assert report.results[0].timings.sample_s > 0


def test_out_of_memory_reads_as_advice():
    assert "--offload" in describe_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))


def test_an_unexpected_error_keeps_its_type_name():
    assert describe_error(KeyError("x")) == "KeyError: 'x'"
