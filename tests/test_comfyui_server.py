"""The pack inside a real ComfyUI server: it imports, /object_info lists every node, the API workflow runs
on tiny model files through POST /prompt and writes an image, caching spares the MLLM when only the seed
changes, and bad input comes back as a node error while the server keeps running.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout) and optionally ``COMFYUI_PYTHON`` (its interpreter; default:
this one). The server (``comfy_server.py``) runs with --cpu on 127.0.0.1 on a free port (the first free one of
``STEP1X_COMFYUI_PORTS``, e.g. ``8190-8194``, when set), in a temporary base directory that holds the pack
(linked), tiny models under the real file names and an input image. With ``STEP1X_UI_CHECK`` (the path of
``tests/ui_check/check_workflow_ui.mjs``, run with ``node``) the UI workflows and the pack's templates are
also loaded into the real frontend, and their layout is measured; ``STEP1X_FRONTEND_ROOT`` serves another
frontend build (``--front-end-root``, e.g. the ``static`` folder of a newer ``comfyui-frontend-package``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from comfy_server import (
    COMFYUI,
    IMAGE_SIZE,
    MODEL_NAMES,
    PACK_FOLDER,
    api_prompt,
    messages,
    prepare_base,
    require_comfyui,
    serve,
)
from node_support import API_WORKFLOWS, BUILTINS, load_pack, template_files

require_comfyui("to test the pack inside the real ComfyUI")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_base")
    prepare_base(base)
    with serve(base) as srv:
        yield srv


# ------------------------------------------------------------------------------------------------ tests


def test_the_pack_imports_without_error(server):
    log = server.log.read_text(errors="replace")
    assert f"Cannot import {server.base / 'custom_nodes' / PACK_FOLDER}" not in log
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_FOLDER in line]


def test_object_info_lists_every_node_as_defined(server):
    info = server.get("/object_info")
    pack = load_pack()
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        entry = info[node_id]
        assert entry["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert entry["category"] == "Step1X-Edit" and entry["description"] == cls.DESCRIPTION
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            assert entry["input_order"].get(section, []) == list(types.get(section, {}))
        assert entry["output"] == list(cls.RETURN_TYPES)
        assert entry["output_name"] == list(cls.RETURN_NAMES)
    choices = info["Step1XEditMLLMLoader"]["input"]["required"]["mllm_name"][0]
    assert MODEL_NAMES["mllm"] in choices and not any("/" in c for c in choices)


def test_the_builtins_the_workflows_use_are_as_listed(server):
    info = server.get("/object_info")
    for name, (inputs, outputs) in BUILTINS.items():
        entry = info[name]
        order = entry["input_order"]["required"] + entry["input_order"].get("optional", [])
        assert [n for n, _ in inputs] == order, name
        for input_name, kind in inputs:
            actual = {**entry["input"]["required"], **entry["input"].get("optional", {})}[input_name][0]
            combo = isinstance(actual, list) or actual == "COMBO"  # V1 lists the choices, V3 names the type
            assert combo if isinstance(kind, list) else actual == kind, (name, input_name)
        # links are by slot: a newer ComfyUI may add outputs after those (SaveImage returns its IMAGE in 0.33)
        assert tuple(entry["output"][:len(outputs)]) == outputs, name


def test_the_api_workflow_runs_and_writes_an_image_at_the_original_size(server):
    from PIL import Image

    entry = server.run(api_prompt())
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["10"]["images"][0]
    path = server.output_file(image)
    with Image.open(path) as saved:
        assert saved.size == IMAGE_SIZE
    log = server.log.read_text(errors="replace")
    for model in ("Step1XEdit", "ModuleHolder", "AutoEncoder"):
        assert f"Requested to load {model}" in log, f"{model} was not loaded through ComfyUI's model management"


def test_the_api_workflow_runs_on_a_gguf_dit_from_the_unet_folder(server):
    choices = server.get("/object_info/Step1XEditDiTLoader")["Step1XEditDiTLoader"]["input"]["required"]
    assert MODEL_NAMES["gguf"] in choices["unet_name"][0]
    entry = server.run(api_prompt(**{"1__unet_name": MODEL_NAMES["gguf"], "7__seed": 7}))
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["10"]["images"][0]
    assert server.output_file(image).is_file()
    assert "GGUF tensors" in server.log.read_text(errors="replace")


def test_changing_only_the_seed_does_not_re_encode_the_instruction(server):
    server.run(api_prompt(**{"7__seed": 1}))
    entry = server.run(api_prompt(**{"7__seed": 2}))
    assert entry["status"]["status_str"] == "success"
    cached = set(messages(entry, "execution_cached")[0]["nodes"])
    assert {"1", "2", "3", "4", "5", "6"} <= cached, cached
    assert "7" not in cached


def test_the_mask_from_load_image_guides_the_edit(server):
    entry = server.run(api_prompt(**{"7__mask": ["4", 1]}))
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_comfyuis_own_vae_decode_decodes_the_sampler_latent(server):
    prompt = api_prompt()
    prompt["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}}
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_text_to_image_runs_from_the_same_nodes(server):
    from PIL import Image

    prompt = api_prompt()
    for node in ("4", "9"):
        del prompt[node]
    prompt["4"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}}
    del prompt["5"]["inputs"]["image"]
    del prompt["7"]["inputs"]["reference_image"]
    prompt["7"]["inputs"]["init_latent"] = ["4", 0]
    prompt["10"]["inputs"]["images"] = ["8", 0]
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["10"]["images"][0]
    with Image.open(server.output_file(image)) as saved:
        assert saved.size == (64, 48)


def test_cancel_stops_the_sampler_between_steps(server):
    server.run(api_prompt(**{"7__seed": 9}))
    entry = server.cancel(api_prompt(**{"7__seed": 9, "7__steps": 200}), after_s=1.0)
    interrupted = messages(entry, "execution_interrupted")
    assert interrupted and interrupted[0]["node_type"] == "Step1XEditSampler", entry["status"]
    assert server.run(api_prompt(**{"7__seed": 10}))["status"]["status_str"] == "success"


def test_a_missing_model_file_is_a_node_error_and_the_server_keeps_running(server):
    status, answer = server.post_prompt(api_prompt(**{"1__unet_name": "missing.safetensors"}))
    assert status == 400
    errors = answer["node_errors"]["1"]["errors"]
    assert errors[0]["type"] == "value_not_in_list" and "missing.safetensors" in errors[0]["details"]
    assert server.run(api_prompt())["status"]["status_str"] == "success"


def test_bad_input_at_run_time_is_a_node_error_and_the_server_keeps_running(server):
    entry = server.run(api_prompt(**{"7__cfg": math.nan}))
    assert entry["status"]["status_str"] == "error"
    error = messages(entry, "execution_error")[0]
    assert error["node_id"] == "7" and error["node_type"] == "Step1XEditSampler"
    assert "cfg is nan; set a finite number" in error["exception_message"]
    assert server.run(api_prompt(**{"7__seed": 5}))["status"]["status_str"] == "success"


def test_a_wrong_model_file_is_reported_under_the_packs_own_error_name(server):
    entry = server.run(api_prompt(**{"1__unet_name": "flux1-dev-tiny.safetensors"}))
    error = messages(entry, "execution_error")[0]
    assert error["node_id"] == "1" and "not a Step1X-Edit DiT" in error["exception_message"]
    assert error["exception_type"] == "step1x.checkpoints.safetensors_file.CheckpointError"
    assert server.run(api_prompt(**{"7__seed": 6}))["status"]["status_str"] == "success"


def test_zero_steps_are_refused_before_running(server):
    status, answer = server.post_prompt(api_prompt(**{"7__steps": 0}))
    assert status == 400
    assert answer["node_errors"]["7"]["errors"][0]["type"] == "value_smaller_than_min"


UI_CHECK = os.environ.get("STEP1X_UI_CHECK")
needs_ui_check = pytest.mark.skipif(not UI_CHECK, reason=(
    "STEP1X_UI_CHECK is not set; point it at tests/ui_check/check_workflow_ui.mjs (run with node and a headless "
    "Chromium) to load the workflows and templates in the real frontend"))

LEGACY_OUTPUT_NAMES = {
    "Step1XEditDiTLoader": ["model"], "Step1XEditMLLMLoader": ["mllm"], "Step1XEditVAELoader": ["vae"],
    "Step1XEditLoraLoader": ["model"], "Step1XEditTeaCache": ["model"], "Step1XEditInstructionEncode": ["embeddings"],
    "Step1XEditConnector": ["conditioning"], "Step1XEditResize": ["image", "mask", "width", "height"],
    "Step1XEditRestoreSize": ["image"],
}
"""The output names the pack's nodes had before they followed ComfyUI's (workflows saved then carry them)."""


def _ui_check(server, files, *options) -> dict:
    report = server.base / f"ui_report_{uuid.uuid4().hex}.json"
    result = subprocess.run(["node", UI_CHECK, "--url", server.url, "--json", str(report), *options,
                             *[str(p) for p in files]], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return json.loads(report.read_text())


def _pinned_frontend() -> str | None:
    """The comfyui-frontend-package version the ComfyUI checkout pins in its requirements.txt."""
    for line in (Path(COMFYUI) / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("comfyui-frontend-package=="):
            return line.split("==", 1)[1].strip()
    return None


@needs_ui_check
def test_templates_load_in_the_frontend_cleanly_and_read_well_at_their_saved_view(server):
    report = _ui_check(server, template_files(), "--layout", "--templates", PACK_FOLDER)
    print(f"frontend {report['frontendVersion']} (ComfyUI pins {_pinned_frontend()})")
    if os.environ.get("STEP1X_FRONTEND_ROOT"):
        assert report["frontendVersion"] != _pinned_frontend(), "the server did not serve STEP1X_FRONTEND_ROOT"
    else:
        assert report["frontendVersion"] == _pinned_frontend()
    workflows = {Path(entry["file"]).name: entry for entry in report["workflows"]}
    assert set(workflows) == {p.name for p in template_files()}
    for name, entry in workflows.items():
        assert entry["ok"] and not (entry["missing"] or entry["toasts"] or entry["widgetDiffs"]), (name, entry)
        assert entry["layout"] is not None and not entry["layout"]["problems"], (name, entry["layout"])
    cards = {entry["name"]: entry for entry in report["templates"]}
    assert set(cards) == {p.stem for p in template_files()} | {"(category)"}
    assert all(entry["ok"] for entry in cards.values()), cards
    queued = workflows["step1x_edit_basic.json"]["apiPrompt"]
    api = json.loads((API_WORKFLOWS / "step1x_edit_api.json").read_text(encoding="utf-8"))
    strip = lambda prompt: {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()}  # noqa: E731
    assert strip(queued) == strip(api), "the API workflow is what the frontend queues for the basic workflow"


@needs_ui_check
def test_workflows_saved_with_the_former_output_names_still_load_and_queue_the_same(server, tmp_path):
    """Links are by slot index, so a workflow saved before the outputs were renamed keeps working."""
    files = []
    for path in template_files():
        wf = json.loads(path.read_text(encoding="utf-8"))
        for node in wf["nodes"]:
            for output, name in zip(node["outputs"], LEGACY_OUTPUT_NAMES.get(node["type"], []), strict=False):
                output["name"] = name
        files.append(tmp_path / path.name)
        files[-1].write_text(json.dumps(wf), encoding="utf-8")
    report = _ui_check(server, files)
    for entry in report["workflows"]:
        assert entry["ok"] and not (entry["missing"] or entry["toasts"] or entry["widgetDiffs"]), entry
    queued = {Path(e["file"]).name: e["apiPrompt"] for e in report["workflows"]}["step1x_edit_basic.json"]
    api = json.loads((API_WORKFLOWS / "step1x_edit_api.json").read_text(encoding="utf-8"))
    strip = lambda prompt: {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()}  # noqa: E731
    assert strip(queued) == strip(api)
