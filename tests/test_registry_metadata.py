"""The metadata the Comfy Registry reads: a node id it accepts, the ComfyUI versions the pack is tested on,
classifiers ComfyUI recognises, and a published archive without the development files."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from node_support import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

TESTED_COMFYUI = ("0.3.64", "0.33.0")
"""The ComfyUI versions the real-ComfyUI tests were run on (README: Install in ComfyUI)."""

OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}
"""The classifier values ComfyUI's ``comfy_config`` accepts; one unknown value voids the whole list."""


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_node_id_follows_the_registry_rules(pyproject):
    name = pyproject["project"]["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name)
    assert not re.search(r"[._-]{2}", name), "no consecutive special characters"
    assert "comfyui" not in name.lower(), "the Registry asks for node ids without 'ComfyUI'"


def test_the_python_package_keeps_its_name(pyproject):
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["step1x", "step1x.*"]
    assert pyproject["project"]["scripts"]["step1x-edit"] == "step1x.cli:main"


def test_requires_comfyui_admits_every_tested_version(pyproject):
    spec = pyproject["tool"]["comfy"]["requires-comfyui"]
    floor = re.fullmatch(r">=(\d+\.\d+\.\d+)", spec)
    assert floor, f"requires-comfyui {spec!r} should be a plain floor (an upper bound would refuse newer ComfyUI)"
    assert min(_version(v) for v in TESTED_COMFYUI) == _version(floor.group(1))


def test_classifiers_are_ones_comfyui_recognises(pyproject):
    classifiers = pyproject["project"]["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment :: ")]
    assert systems and all(s.startswith(OS_PREFIXES) for s in systems)
    assert accelerators and set(accelerators) <= ACCELERATORS


def test_an_icon_is_a_url_and_the_picture_is_square(pyproject):
    from PIL import Image

    icon = pyproject["tool"]["comfy"].get("Icon")
    assert icon is None or icon.startswith("https://"), "Icon is a URL (left out until the repository is public)"
    with Image.open(ROOT / "assets" / "icon.png") as picture:
        assert picture.size[0] == picture.size[1] >= 128


@pytest.mark.skipif(shutil.which("git") is None, reason="git matches .comfyignore's gitignore patterns")
def test_the_published_archive_leaves_out_tests_benchmarks_and_ci(tmp_path):
    """``.comfyignore`` has gitignore syntax; git itself tells which paths it leaves out."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copyfile(ROOT / ".comfyignore", tmp_path / ".gitignore")
    left_out = ["tests/test_workflows.py", "tests/ui_check/check_workflow_ui.mjs", "benchmarks/bench_dit.py", ".ci/run"]
    kept = ["__init__.py", "nodes/_comfy.py", "step1x/cli.py", "workflows/step1x_edit_basic.json",
            "workflows/step1x_edit_basic.jpg", "workflows/api/step1x_edit_api.json", "requirements.txt",
            "pyproject.toml", "README.md", "LICENSE", "assets/icon.png"]
    result = subprocess.run(["git", "-C", str(tmp_path), "check-ignore", "--no-index", *left_out, *kept],
                            capture_output=True, text=True)
    assert set(result.stdout.split()) == set(left_out)
