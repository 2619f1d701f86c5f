"""Step1X-Edit v1.2 inside a real ComfyUI server: the loaders list the model folders, both v1.2 workflows run on
a tiny model folder (in the API form the frontend would queue, built here from the UI files and /object_info),
Cancel stops a reasoning edit, and the bad inputs (a v1.2 folder without text_encoder/, a truncated shard, an
index naming a missing shard, reflection with max tries 0, an instruction over 2048 tokens, model replies that
never close their tags) give clear errors or the documented behaviour while the server keeps running.

Needs ``COMFYUI_PATH`` (and ``COMFYUI_PYTHON``), as ``test_comfyui_server.py``; the server (``comfy_server.py``)
listens on the first free port of ``STEP1X_COMFYUI_PORTS`` (e.g. "8185-8189") when set, else on any free port.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from comfy_server import COMFYUI, FAST, IMAGE_SIZE, link_pack, messages, require_comfyui, serve
from node_support import API_WORKFLOWS, WORKFLOWS

require_comfyui("to test the v1.2 nodes inside the real ComfyUI")

V12 = "Step1X-Edit-v1p2"
BROKEN = {"no_text_encoder": f"{V12}-no-text-encoder", "truncated": f"{V12}-truncated",
          "missing_shard": f"{V12}-missing-shard"}
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _prepare_base(base: Path) -> None:
    from PIL import Image

    from helpers import seeded_image
    from step1x.tiny import build_tiny_model_folder

    link_pack(base)
    dits = base / "models" / "diffusion_models"
    tokenizer = Path(COMFYUI) / "comfy" / "text_encoders" / "qwen25_tokenizer"
    folder = build_tiny_model_folder(dits / V12, tokenizer, version="v1.2")
    no_encoder = dits / BROKEN["no_text_encoder"]
    no_encoder.mkdir()
    for part in ("transformer", "vae"):
        (no_encoder / part).symlink_to(folder / part, target_is_directory=True)
    for key in ("truncated", "missing_shard"):
        shutil.copytree(folder / "transformer", dits / BROKEN[key] / "transformer")
    truncated = sorted((dits / BROKEN["truncated"] / "transformer").glob("*-00002-of-00002.safetensors"))[0]
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    sorted((dits / BROKEN["missing_shard"] / "transformer").glob("*-00001-of-00002.safetensors"))[0].unlink()
    (base / "input").mkdir()
    seeded_image(*IMAGE_SIZE, seed=1).save(base / "input" / "example.png")
    assert Image.open(base / "input" / "example.png").size == IMAGE_SIZE


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_v12")
    _prepare_base(base)
    with serve(base) as srv:
        yield srv


@pytest.fixture(scope="module")
def info(server):
    return server.get("/object_info")


# ----------------------------------------------------------------------------------- UI -> API workflow


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGETS


def api_prompt(name: str, info: dict, **changes) -> dict:
    """The API prompt of a UI workflow, as the frontend queues it: widget values by input name (the values of
    control_after_generate and of Load Image's upload button skipped), links as [source id, slot]; then
    ``changes`` ("<node id>__<input>": value; None drops the input)."""
    workflow = json.loads((WORKFLOWS / name).read_text(encoding="utf-8"))
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        spec = info[node["type"]]
        defs = {**spec["input"]["required"], **spec["input"].get("optional", {})}
        order = spec["input_order"]["required"] + spec["input_order"].get("optional", [])
        sockets = {entry["name"]: entry["link"] for entry in node["inputs"] if "widget" not in entry}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for input_name in order:
            options = defs[input_name][1] if len(defs[input_name]) > 1 else {}
            if input_name in sockets and not _is_widget(defs[input_name]):
                link = sockets[input_name]
                if link is not None:
                    inputs[input_name] = [str(links[link][1]), links[link][2]]
            elif _is_widget(defs[input_name]) and values:
                inputs[input_name] = values.pop(0)
                if options.get("control_after_generate") or input_name in ("seed", "noise_seed"):
                    values.pop(0)
                if options.get("image_upload"):
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    for key, value in changes.items():
        node, input_name = key.split("__")
        if value is None:
            prompt[node]["inputs"].pop(input_name, None)
        else:
            prompt[node]["inputs"][input_name] = value
    return prompt


def plain(info, **changes) -> dict:
    return api_prompt("step1x_v12_edit.json", info, **{"5__size_level": FAST["size_level"],
                                                       "7__steps": FAST["steps"], **changes})


def reasoning(info, **changes) -> dict:
    """The reasoning workflow, small: one try, one attempt per step, two new tokens per reply."""
    prompt = api_prompt("step1x_v12_reason_edit.json", info, **{
        "5__size_level": FAST["size_level"], "5__steps": FAST["steps"], "5__max_tries": 1, "5__retries": 1,
        "5__max_new_tokens": 2, **changes})
    prompt["90"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}}
    return prompt


def saved(server, entry: dict, node: str) -> list[Path]:
    return [server.output_file(image) for image in entry["outputs"][node]["images"]]


def error_of(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    return messages(entry, "execution_error")[0]


# ----------------------------------------------------------------------------------------------- tests


def combo(info: dict, node: str, name: str) -> list:
    spec = info[node]["input"]["required"][name]
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])


def test_the_loaders_list_the_model_folders(info):
    dits = combo(info, "Step1XEditDiTLoader", "unet_name")
    vaes = combo(info, "Step1XEditVAELoader", "vae_name")
    mllms = combo(info, "Step1XEditMLLMLoader", "mllm_name")
    assert {V12, *BROKEN.values()} <= set(dits) and not any(d.startswith(V12 + "/") for d in dits)
    assert f"{V12}/vae" in vaes
    assert V12 in mllms and BROKEN["no_text_encoder"] not in mllms
    for node in ("Step1XEditThink", "Step1XEditReflect", "Step1XEditReasonEdit"):
        assert info[node]["category"] == "Step1X-Edit"


def test_the_plain_v12_workflow_runs(server, info):
    from PIL import Image

    entry = server.run(plain(info))
    assert entry["status"]["status_str"] == "success", entry["status"]
    with Image.open(saved(server, entry, "10")[0]) as image:
        assert image.size == IMAGE_SIZE
    log = server.log.read_text(errors="replace")
    for model in ("Step1XEdit", "ModuleHolder", "AutoEncoder"):
        assert f"Requested to load {model}" in log


def test_the_reasoning_workflow_runs_and_documents_replies_that_never_close_their_tags(server, info):
    from PIL import Image

    entry = server.run(reasoning(info))
    assert entry["status"]["status_str"] == "success", entry["status"]
    best, = saved(server, entry, "6")
    tries = saved(server, entry, "7")
    assert len(tries) == 1
    with Image.open(best) as image:
        assert image.size == IMAGE_SIZE
    text = entry["outputs"]["90"]["text"][0]
    assert "Thinking:" in text and "Try 1: edited the original image" in text
    assert "Reflection (failed): <#Think> The process encountered repeated errors" in text
    assert "Best: try 1 of 1." in text


def test_reflect_on_its_own_falls_back_when_replies_never_close_their_tags(server, info):
    prompt = {
        "1": {"class_type": "Step1XEditMLLMLoader",
              "inputs": {"mllm_name": V12, "dtype": "fp32", "device": "default", "lm_head": True}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "3": {"class_type": "Step1XEditReflect",
              "inputs": {"mllm": ["1", 0], "reference": ["2", 0], "edited": ["2", 0], "instruction": "make it blue",
                         "seed": 0, "max_new_tokens": 2, "retries": 1}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
    }
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["4"]["text"][0].startswith("<#Think> The process encountered repeated errors")
    assert entry["outputs"]["5"]["text"][0] == "False"


def test_cancel_stops_a_reasoning_edit_between_tokens(server, info):
    prompt = reasoning(info, **{"5__max_new_tokens": 4096, "5__retries": 20, "5__max_tries": 3, "5__seed": 77})
    entry = server.cancel(prompt, after_s=3.0)
    interrupted = messages(entry, "execution_interrupted")
    assert interrupted and interrupted[0]["node_type"] == "Step1XEditReasonEdit", entry["status"]
    assert server.run(plain(info, **{"7__seed": 3}))["status"]["status_str"] == "success"


def test_a_workflow_saved_before_the_v12_inputs_still_runs(server):
    """API prompts saved without Instruction Encode's layout and the MLLM loader's lm_head (layout auto, no head)."""
    prompt = json.loads((API_WORKFLOWS / "step1x_edit_api.json").read_text(encoding="utf-8"))
    prompt["2"]["inputs"].pop("lm_head")
    prompt["5"]["inputs"].pop("layout")
    prompt["1"]["inputs"]["unet_name"] = prompt["2"]["inputs"]["mllm_name"] = V12
    prompt["3"]["inputs"]["vae_name"] = f"{V12}/vae"
    prompt["5"]["inputs"]["size_level"], prompt["7"]["inputs"]["steps"] = FAST["size_level"], FAST["steps"]
    assert server.run(prompt)["status"]["status_str"] == "success"


# ------------------------------------------------------------------------------------------- bad inputs


def test_a_v12_folder_without_text_encoder_is_not_offered_as_the_mllm(server, info):
    status, answer = server.post_prompt(plain(info, **{"2__mllm_name": BROKEN["no_text_encoder"]}))
    assert status == 400
    error = answer["node_errors"]["2"]["errors"][0]
    assert error["type"] == "value_not_in_list" and BROKEN["no_text_encoder"] in error["details"]
    assert server.run(plain(info, **{"7__seed": 4}))["status"]["status_str"] == "success"


def test_a_truncated_shard_is_a_node_error_that_names_it(server, info):
    error = error_of(server.run(plain(info, **{"1__unet_name": BROKEN["truncated"]})))
    assert error["node_type"] == "Step1XEditDiTLoader"
    assert "truncated" in error["exception_message"] and "-00002-of-00002.safetensors" in error["exception_message"]
    assert server.run(plain(info, **{"7__seed": 5}))["status"]["status_str"] == "success"


def test_an_index_naming_a_missing_shard_is_a_node_error(server, info):
    error = error_of(server.run(plain(info, **{"1__unet_name": BROKEN["missing_shard"]})))
    assert error["node_type"] == "Step1XEditDiTLoader"
    assert "-00001-of-00002.safetensors" in error["exception_message"] and "incomplete" in error["exception_message"]
    assert server.run(plain(info, **{"7__seed": 6}))["status"]["status_str"] == "success"


def test_reflection_with_max_tries_0_is_refused_before_running(server, info):
    status, answer = server.post_prompt(reasoning(info, **{"5__max_tries": 0}))
    assert status == 400
    assert answer["node_errors"]["5"]["errors"][0]["type"] == "value_smaller_than_min"


def test_an_instruction_over_2048_tokens_is_cut_as_the_reference_does(server, info):
    entry = server.run(plain(info, **{"5__instruction": "purple " * 2100}))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "the DiT gets the first 2048" in server.log.read_text(errors="replace")


def test_a_v11_layout_on_the_v12_dit_is_refused_with_what_to_change(server, info):
    error = error_of(server.run(plain(info, **{"5__layout": "v1.0-v1.1"})))
    assert error["node_type"] == "Step1XEditConnector"
    assert "set Instruction Encode's layout to v1.2" in error["exception_message"]
    assert server.run(plain(info, **{"7__seed": 8}))["status"]["status_str"] == "success"
