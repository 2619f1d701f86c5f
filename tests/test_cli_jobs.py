"""Job planning and writing: names stay inside their folders, formats map to writable ones, and an
interrupted write leaves nothing under the final name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from step1x.batch import save_atomic
from step1x.jobs import JobError, edit_jobs, output_path, read_prompts, safe_relative


@pytest.mark.parametrize("name", ["../x.png", "/etc/x.png", "a/../../x.png", "C:\\x.png", "\\\\server\\x.png", " "])
def test_names_outside_the_folder_are_refused(name):
    with pytest.raises(JobError):
        safe_relative(name)


def test_subfolders_inside_the_folder_are_kept():
    assert safe_relative("set1/cat.png") == Path("set1") / "cat.png"


@pytest.mark.parametrize("name,fmt,expected", [
    ("cat.png", None, "cat.png"),
    ("cat.JPG", None, "cat.JPG"),
    ("cat.heic", None, "cat.png"),
    ("cat", None, "cat.png"),
    ("cat.png", "webp", "cat.webp"),
])
def test_output_names_follow_the_input_or_the_forced_format(tmp_path, name, fmt, expected):
    assert output_path(tmp_path, name, fmt) == tmp_path / expected


def test_two_entries_writing_the_same_file_are_refused(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(JobError, match="would both be written to"):
        edit_jobs(tmp_path / "in", {"a.heic": "x", "a.png": "y"}, tmp_path / "out")


def test_a_missing_prompts_file_is_named(tmp_path):
    with pytest.raises(JobError, match=r"prompts file not found: .*nope\.json"):
        read_prompts(tmp_path / "nope.json")


def test_a_prompts_file_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "p.json").write_bytes('\ufeff{"a.png": "make it red"}'.encode("utf-8"))
    assert read_prompts(tmp_path / "p.json") == {"a.png": "make it red"}


class _FailingImage:
    """Writes some bytes, then fails, like a full disk or Ctrl-C in the middle of a save."""

    def save(self, f, format=None, **_):
        f.write(b"half an image")
        raise KeyboardInterrupt


def test_an_interrupted_write_leaves_no_file_behind(tmp_path):
    (tmp_path / "a.png").write_bytes(b"previous result")
    with pytest.raises(KeyboardInterrupt):
        save_atomic(_FailingImage(), tmp_path / "a.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    assert (tmp_path / "a.png").read_bytes() == b"previous result"


def test_a_written_result_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        save_atomic(Image.new("RGB", (8, 8)), tmp_path / "a.webp")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.webp").stat().st_mode & 0o777 == 0o644
    with Image.open(tmp_path / "a.webp") as im:
        assert im.format == "WEBP"
