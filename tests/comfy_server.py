"""A real ComfyUI for the tests that need one (no fixtures, no tests): a server on a temporary base directory
that holds the pack (linked under ``custom_nodes``) and tiny models under the real file names, its HTTP API
(queue a prompt, wait for its history entry), and scripts run in ComfyUI's own interpreter without a server.

``COMFYUI_PATH`` names the ComfyUI checkout and ``COMFYUI_PYTHON`` its interpreter (default: this one). A server
runs with --cpu on 127.0.0.1, on the first free port of ``STEP1X_COMFYUI_PORTS`` (e.g. ``8190-8194``) when set,
else on any free port; ``STEP1X_FRONTEND_ROOT`` serves another frontend build (``--front-end-root``).
"""

from __future__ import annotations

import json
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

from node_support import API_WORKFLOWS, ROOT, lib, write_tiny_models

COMFYUI = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
PACK_FOLDER = "ComfyUI-Step1X-Edit"
MODEL_NAMES = {"dit": "step1x-edit-v1p1-official.safetensors", "vae": "step1x-edit-vae.safetensors",
               "mllm": "Qwen2.5-VL-7B-Instruct", "gguf": "step1x-edit-v1p1-official-Q4_1.gguf"}
IMAGE_SIZE = (96, 72)
FAST = {"steps": 2, "size_level": 64}
STARTUP_S = 240
"""How long a starting server may take to answer."""


def require_comfyui(purpose: str) -> None:
    """Skip the calling test module when no ComfyUI checkout is named; ``purpose``: "to test ..."."""
    if not COMFYUI:
        pytest.skip("COMFYUI_PATH is not set; point it at a ComfyUI checkout (and COMFYUI_PYTHON at its interpreter) "
                    + purpose, allow_module_level=True)


# ------------------------------------------------------------------------------------------------ server


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

    def interrupt(self, prompt_id: str) -> None:
        self.post("/interrupt", {"prompt_id": prompt_id})

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        status, answer = self.post_prompt(prompt)
        assert status == 200, answer
        return self.wait(answer["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s; see {self.log}")

    def running(self) -> list[str]:
        return [item[1] for item in self.get("/queue")["queue_running"]]

    def cancel(self, prompt: dict, after_s: float, timeout: float = 120) -> dict:
        """Queue ``prompt``, interrupt it ``after_s`` seconds after it starts running; its history entry."""
        status, answer = self.post_prompt(prompt)
        assert status == 200, answer
        deadline = time.monotonic() + 60
        while answer["prompt_id"] not in self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(after_s)
        self.interrupt(answer["prompt_id"])
        return self.wait(answer["prompt_id"], timeout)

    def output_file(self, image: dict) -> Path:
        """Where an image (or latent) of a history entry's outputs was saved."""
        return self.base / "output" / image["subfolder"] / image["filename"]


def free_port() -> int:
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


def link_pack(base: Path) -> None:
    """``base/custom_nodes`` with the pack linked in, as a user installs it."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)


def prepare_base(base: Path) -> None:
    """A base directory with the pack, the tiny models under the real names (the v1.1 DiT, a Q4_1 GGUF of it in
    the legacy ``unet`` folder, the VAE also as ``ae.safetensors``, the MLLM folder behind a link) and an
    input image."""
    link_pack(base)
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
    """A ComfyUI server on ``base`` (prepared by :func:`prepare_base` or alike), answering until the block ends;
    stopped by its process when it does."""
    port = free_port()
    log = base / "comfyui.log"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    args = ["--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
            "--disable-auto-launch", "--preview-method", "latent2rgb", *extra_args]
    if os.environ.get("STEP1X_FRONTEND_ROOT"):
        args += ["--front-end-root", os.environ["STEP1X_FRONTEND_ROOT"]]
    with open(log, "wb") as out:
        process = subprocess.Popen([PYTHON, "main.py", *args], cwd=COMFYUI, stdout=out, stderr=subprocess.STDOUT,
                                   env=env)
    try:
        srv = Server(f"http://127.0.0.1:{port}", base, log)
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                srv.get("/object_info/SaveImage")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {STARTUP_S} s; see {log}")
                time.sleep(0.5)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def api_prompt(**changes) -> dict:
    """The pack's API workflow at the fast test sizes, with ``changes`` ("<node id>__<input>": value)."""
    prompt = json.loads((API_WORKFLOWS / "step1x_edit_api.json").read_text(encoding="utf-8"))
    prompt["5"]["inputs"]["size_level"] = FAST["size_level"]
    prompt["7"]["inputs"]["steps"] = FAST["steps"]
    for key, value in changes.items():
        node, name = key.split("__")
        prompt[node]["inputs"][name] = value
    return prompt


def with_lora(prompt: dict, lora_name: str, strength: float) -> dict:
    """The API workflow ``prompt`` with the pack's LoRA loader (node 20) between the DiT loader and the sampler."""
    prompt["20"] = {"class_type": "Step1XEditLoraLoader",
                    "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength": strength}}
    prompt["7"]["inputs"]["model"] = ["20", 0]
    return prompt


def messages(entry: dict, event: str) -> list[dict]:
    """The data of a history entry's status messages of one kind ("execution_error", ...)."""
    return [data for name, data in entry["status"]["messages"] if name == event]


def saved_image(server: Server, entry: dict, node_id: str = "10"):
    """The RGB pixels a successful run's SaveImage node (``node_id``) wrote, as a numpy array."""
    import numpy as np
    from PIL import Image

    assert entry["status"]["status_str"] == "success", entry["status"]
    with Image.open(server.output_file(entry["outputs"][node_id]["images"][0])) as saved:
        return np.asarray(saved.convert("RGB"))


# ---------------------------------------------------------------------------------- scripts, no server

SCRIPT_START = r"""
import json, sys
config = json.loads(sys.argv[1])
sys.argv = ["main.py", "--cpu"]
sys.path[:0] = [config["comfyui"], config["tests"]]
import importlib
import comfy.options
comfy.options.enable_args_parsing()
"""
"""How a script run by :func:`run_script` begins: ComfyUI set up as by ``main.py --cpu``, its config in ``config``
and this folder importable (``node_support``)."""


DIT_WITH_A_LORA = r"""
import comfy.model_management as mm
import folder_paths
import torch
from safetensors.torch import save_file
from node_support import load_pack, run_node

pack = load_pack()
assert sys.modules["step1x_edit_pack.nodes._comfy"].IN_COMFYUI
for kind in ("diffusion_models", "loras"):
    folder_paths.add_model_folder_path(kind, config[kind])
base = run_node(pack, "Step1XEditDiTLoader", unet_name=config["dit"], weight_dtype=config["weight_dtype"],
                attention="sdpa")[0]
lora = run_node(pack, "Step1XEditLoraLoader", model=base, lora_name=config["lora"], strength=config["strength"])[0]
sampling = importlib.import_module("step1x_edit_pack.step1x.sampling.denoise")
g = torch.Generator().manual_seed(0)
text = sampling.TextConditioning(torch.randn(1, 8, base.model.params.connector.in_channels, generator=g),
                                 torch.ones(1, 8, dtype=torch.long))
noise, reference = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
edit = lambda model: sampling.denoise(model.model, noise, text, None, reference=reference, steps=2,
                                      compute_dtype=model.compute_dtype, device=torch.device("cpu"))
"""
"""A script's first part that loads the DiT (``config``: its folders, "dit", "weight_dtype") through the pack's
loader node and a LoRA on it ("lora", "strength"): ``pack``, ``base``, ``lora``, and ``edit(model)``, a seeded
two-step edit."""


def run_script(body: str, config: dict, timeout: float = 300) -> str:
    """Run :data:`SCRIPT_START` + ``body`` in ComfyUI's interpreter and folder, with ``config`` (plus the ComfyUI
    and tests folders) as its JSON argument; its standard output, once it has exited cleanly."""
    config = {"comfyui": COMFYUI, "tests": str(ROOT / "tests"), **config}
    result = subprocess.run([PYTHON, "-c", SCRIPT_START + body, json.dumps(config)], cwd=COMFYUI, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def saved_tensors(path: str | Path) -> tuple[dict, dict]:
    """The tensors and the metadata of a .safetensors file a script wrote."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata
