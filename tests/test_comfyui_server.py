"""The pack inside a real ComfyUI server: it imports, /object_info lists every node, the API workflow runs
on tiny model files through POST /prompt and writes an image, caching spares the MLLM when only the seed
changes, and bad input comes back as a node error while the server keeps running.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout) and optionally ``COMFYUI_PYTHON`` (its interpreter; default:
this one). The server runs with --cpu on 127.0.0.1 on a free port (the first free one of
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
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from node_support import API_WORKFLOWS, BUILTINS, ROOT, lib, load_pack, template_files, write_tiny_models

COMFYUI = os.environ.get("COMFYUI_PATH")
if not COMFYUI:
    pytest.skip("COMFYUI_PATH is not set; point it at a ComfyUI checkout (and COMFYUI_PYTHON at its interpreter) "
                "to test the pack inside the real ComfyUI", allow_module_level=True)

PACK_FOLDER = "ComfyUI-Step1X-Edit"
MODEL_NAMES = {"dit": "step1x-edit-v1p1-official.safetensors", "vae": "step1x-edit-vae.safetensors",
               "mllm": "Qwen2.5-VL-7B-Instruct", "gguf": "step1x-edit-v1p1-official-Q4_1.gguf"}
IMAGE_SIZE = (96, 72)
FAST = {"steps": 2, "size_level": 64}


class Server:
    def __init__(self, url: str, base: Path, log: Path):
        self.url, self.base, self.log = url, base, log

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": prompt, "client_id": str(uuid.uuid4())}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def post(self, route: str, data: dict) -> None:
        request = urllib.request.Request(self.url + route, data=json.dumps(data).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()

    def run(self, prompt: dict, timeout: float = 180) -> dict:
        status, answer = self.post_prompt(prompt)
        assert status == 200, answer
        return self.wait(answer["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s; see {self.log}")

    def running(self) -> list[str]:
        return [item[1] for item in self.get("/queue")["queue_running"]]


def _free_port() -> int:
    """A free local port: the first free one of ``STEP1X_COMFYUI_PORTS`` ("8190-8194") when set, else any."""
    wanted = os.environ.get("STEP1X_COMFYUI_PORTS")
    if wanted:
        first, _, last = wanted.partition("-")
        candidates = range(int(first), int(last or first) + 1)
    else:
        candidates = [0]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in STEP1X_COMFYUI_PORTS={wanted}")


def _prepare_base(base: Path) -> None:
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    models = base / "models"
    tokenizer = Path(COMFYUI) / "comfy" / "text_encoders" / "qwen25_tokenizer"
    names = write_tiny_models(models, tokenizer)
    (models / "diffusion_models" / names["dit"]).rename(models / "diffusion_models" / MODEL_NAMES["dit"])
    (models / "unet").mkdir()  # ComfyUI's legacy folder for DiTs, where GGUF files often live
    lib("checkpoints.gguf_convert").convert(models / "diffusion_models" / MODEL_NAMES["dit"],
                                            models / "unet" / MODEL_NAMES["gguf"], "Q4_1")
    (models / "vae" / names["vae"]).rename(models / "vae" / MODEL_NAMES["vae"])
    shutil.copyfile(models / "vae" / MODEL_NAMES["vae"], models / "vae" / "ae.safetensors")
    # the MLLM folder is a link, as large model folders often are: it must be listed as one model
    (models / "text_encoders" / names["mllm"]).rename(base / MODEL_NAMES["mllm"])
    (models / "text_encoders" / MODEL_NAMES["mllm"]).symlink_to(base / MODEL_NAMES["mllm"], target_is_directory=True)
    (base / "input").mkdir()
    _write_input_image(base / "input" / "example.png")


def _write_input_image(path: Path) -> None:
    """An RGBA image whose left half is transparent: Load Image turns that into a mask of 1s."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(IMAGE_SIZE[1], IMAGE_SIZE[0], 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[:, : IMAGE_SIZE[0] // 2, 3] = 0
    Image.fromarray(pixels, mode="RGBA").save(path)


@contextmanager
def serve(base: Path, *extra_args: str):
    """A ComfyUI server on ``base`` (prepared by :func:`_prepare_base`), answering until the block ends."""
    port = _free_port()
    log = base / "comfyui.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    args = ["--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
            "--disable-auto-launch", "--preview-method", "latent2rgb", *extra_args]
    if os.environ.get("STEP1X_FRONTEND_ROOT"):
        args += ["--front-end-root", os.environ["STEP1X_FRONTEND_ROOT"]]
    with open(log, "wb") as out:
        process = subprocess.Popen([python, "main.py", *args], cwd=COMFYUI, stdout=out, stderr=subprocess.STDOUT,
                                   env=env)
    try:
        srv = Server(f"http://127.0.0.1:{port}", base, log)
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                srv.get("/object_info/SaveImage")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within 180 s; see {log}")
                time.sleep(0.5)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_base")
    _prepare_base(base)
    with serve(base) as srv:
        yield srv


def _api_prompt(**changes) -> dict:
    prompt = json.loads((API_WORKFLOWS / "step1x_edit_api.json").read_text(encoding="utf-8"))
    prompt["5"]["inputs"]["size_level"] = FAST["size_level"]
    prompt["7"]["inputs"]["steps"] = FAST["steps"]
    for key, value in changes.items():
        node, name = key.split("__")
        prompt[node]["inputs"][name] = value
    return prompt


def _messages(entry: dict, event: str) -> list[dict]:
    return [data for name, data in entry["status"]["messages"] if name == event]


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

    entry = server.run(_api_prompt())
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["10"]["images"][0]
    path = server.base / "output" / image["subfolder"] / image["filename"]
    with Image.open(path) as saved:
        assert saved.size == IMAGE_SIZE
    log = server.log.read_text(errors="replace")
    for model in ("Step1XEdit", "ModuleHolder", "AutoEncoder"):
        assert f"Requested to load {model}" in log, f"{model} was not loaded through ComfyUI's model management"


def test_the_api_workflow_runs_on_a_gguf_dit_from_the_unet_folder(server):
    choices = server.get("/object_info/Step1XEditDiTLoader")["Step1XEditDiTLoader"]["input"]["required"]
    assert MODEL_NAMES["gguf"] in choices["unet_name"][0]
    entry = server.run(_api_prompt(**{"1__unet_name": MODEL_NAMES["gguf"], "7__seed": 7}))
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["10"]["images"][0]
    assert (server.base / "output" / image["subfolder"] / image["filename"]).is_file()
    assert "GGUF tensors" in server.log.read_text(errors="replace")


def test_changing_only_the_seed_does_not_re_encode_the_instruction(server):
    server.run(_api_prompt(**{"7__seed": 1}))
    entry = server.run(_api_prompt(**{"7__seed": 2}))
    assert entry["status"]["status_str"] == "success"
    cached = set(_messages(entry, "execution_cached")[0]["nodes"])
    assert {"1", "2", "3", "4", "5", "6"} <= cached, cached
    assert "7" not in cached


def test_the_mask_from_load_image_guides_the_edit(server):
    entry = server.run(_api_prompt(**{"7__mask": ["4", 1]}))
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_comfyuis_own_vae_decode_decodes_the_sampler_latent(server):
    prompt = _api_prompt()
    prompt["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}}
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_text_to_image_runs_from_the_same_nodes(server):
    from PIL import Image

    prompt = _api_prompt()
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
    with Image.open(server.base / "output" / image["subfolder"] / image["filename"]) as saved:
        assert saved.size == (64, 48)


def test_cancel_stops_the_sampler_between_steps(server):
    server.run(_api_prompt(**{"7__seed": 9}))
    status, answer = server.post_prompt(_api_prompt(**{"7__seed": 9, "7__steps": 200}))
    assert status == 200
    deadline = time.monotonic() + 60
    while answer["prompt_id"] not in server.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    server.post("/interrupt", {"prompt_id": answer["prompt_id"]})
    entry = server.wait(answer["prompt_id"], timeout=60)
    interrupted = _messages(entry, "execution_interrupted")
    assert interrupted and interrupted[0]["node_type"] == "Step1XEditSampler", entry["status"]
    assert server.run(_api_prompt(**{"7__seed": 10}))["status"]["status_str"] == "success"


def test_a_missing_model_file_is_a_node_error_and_the_server_keeps_running(server):
    status, answer = server.post_prompt(_api_prompt(**{"1__unet_name": "missing.safetensors"}))
    assert status == 400
    errors = answer["node_errors"]["1"]["errors"]
    assert errors[0]["type"] == "value_not_in_list" and "missing.safetensors" in errors[0]["details"]
    assert server.run(_api_prompt())["status"]["status_str"] == "success"


def test_bad_input_at_run_time_is_a_node_error_and_the_server_keeps_running(server):
    entry = server.run(_api_prompt(**{"7__cfg": math.nan}))
    assert entry["status"]["status_str"] == "error"
    error = _messages(entry, "execution_error")[0]
    assert error["node_id"] == "7" and error["node_type"] == "Step1XEditSampler"
    assert "cfg is nan; set a finite number" in error["exception_message"]
    assert server.run(_api_prompt(**{"7__seed": 5}))["status"]["status_str"] == "success"


def test_a_wrong_model_file_is_reported_under_the_packs_own_error_name(server):
    entry = server.run(_api_prompt(**{"1__unet_name": "flux1-dev-tiny.safetensors"}))
    error = _messages(entry, "execution_error")[0]
    assert error["node_id"] == "1" and "not a Step1X-Edit DiT" in error["exception_message"]
    assert error["exception_type"] == "step1x.checkpoints.safetensors_file.CheckpointError"
    assert server.run(_api_prompt(**{"7__seed": 6}))["status"]["status_str"] == "success"


def test_zero_steps_are_refused_before_running(server):
    status, answer = server.post_prompt(_api_prompt(**{"7__steps": 0}))
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
