"""Every workflow in workflows/ refers only to node types and inputs the pack defines or to the ComfyUI
built-ins listed in BUILTINS, with the widget values the frontend expects (UI format) and complete, typed
links (both formats). The templates ComfyUI lists (the JSON files directly in workflows/) are UI workflows
with a thumbnail each, laid out left to right without overlaps (the frontend check measures the rest)."""

import json
import re

import pytest

from node_support import (
    API_WORKFLOWS,
    BUILTINS,
    WORKFLOWS,
    all_workflow_files,
    api_files,
    load_pack,
    template_files,
    ui_files,
)

SCALARS = ("INT", "FLOAT", "STRING", "BOOLEAN")

FRONTEND_ONLY = {"Note": 1, "MarkdownNote": 1}
"""Frontend-only node types (not in the API format) and their number of widget values."""

EXTRA_WIDGET_VALUES = {"LoadImage": {"image": 1}}
"""Widgets that save a second value: LoadImage's upload button."""


TITLE_HEIGHT = 30
"""Height of a node's title bar above its ``pos`` (LiteGraph's NODE_TITLE_HEIGHT)."""

THUMBNAIL_MAX_BYTES = 60_000


def definitions():
    """class_type -> (inputs [(name, type, optional, options)], output types)."""
    out = {}
    for name, (inputs, outputs) in BUILTINS.items():
        out[name] = ([(n, t, False, {}) for n, t in inputs], outputs)
    for name, cls in load_pack().NODE_CLASS_MAPPINGS.items():
        types = cls.INPUT_TYPES()
        inputs = [(n, spec[0], section == "optional", spec[1] if len(spec) > 1 else {})
                  for section in ("required", "optional") for n, spec in types.get(section, {}).items()]
        out[name] = (inputs, tuple(cls.RETURN_TYPES))
    return out


def output_names():
    """class_type -> the output names the pack's nodes give (RETURN_NAMES)."""
    return {name: tuple(cls.RETURN_NAMES) for name, cls in load_pack().NODE_CLASS_MAPPINGS.items()}


def is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in SCALARS


def widget_value_count(class_type, inputs) -> int:
    count = 0
    for name, kind, _, options in inputs:
        if is_widget(kind):
            count += 1 + EXTRA_WIDGET_VALUES.get(class_type, {}).get(name, 0)
            if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
                count += 1
    return count


def test_the_promised_workflows_exist():
    assert {p.stem for p in template_files()} >= {"step1x_edit_basic", "step1x_edit_lowvram_fp8",
                                                  "step1x_text_to_image", "step1x_edit_mask",
                                                  "step1x_edit_gguf", "step1x_native_ksampler",
                                                  "step1x_native_custom_sampler", "step1x_v12_edit",
                                                  "step1x_v12_reason_edit", "step1x_v12_native_ksampler"}
    assert (API_WORKFLOWS / "step1x_edit_api.json").is_file()


def test_templates_are_ui_workflows_and_api_workflows_sit_in_their_subfolder():
    """ComfyUI offers every workflows/*.json as a template, and its template browser loads only UI workflows."""
    assert set(template_files()) <= set(ui_files())
    assert all(p.parent == API_WORKFLOWS for p in api_files())


@pytest.mark.parametrize("path", template_files(), ids=lambda p: p.name)
def test_every_template_has_a_small_jpeg_thumbnail_of_the_same_name(path):
    from PIL import Image

    thumbnail = path.with_suffix(".jpg")  # the frontend asks for <template name>.jpg
    assert thumbnail.is_file(), f"{path.name} has no thumbnail {thumbnail.name}"
    assert thumbnail.stat().st_size <= THUMBNAIL_MAX_BYTES
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and min(image.size) >= 256, (image.format, image.size)


def test_no_thumbnail_lacks_its_template():
    assert {p.stem for p in WORKFLOWS.glob("*.jpg")} == {p.stem for p in template_files()}


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: p.name)
def test_ui_workflow_matches_the_node_definitions(path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    defs = definitions()
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "node ids must be unique"
    links = {link[0]: link for link in wf["links"]}
    for node in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties"):
            assert key in node, f"{path.name}: node {node.get('id')} lacks {key!r}"
        kind = node["type"]
        if kind in FRONTEND_ONLY:
            assert len(node["widgets_values"]) == FRONTEND_ONLY[kind]
            continue
        assert kind in defs, f"{path.name}: node type {kind} is neither in the pack nor in BUILTINS"
        inputs, outputs = defs[kind]
        sockets = {n: (t, optional) for n, t, optional, _ in inputs if not is_widget(t)}
        for slot, entry in enumerate(node["inputs"]):
            assert entry["name"] in sockets, f"{path.name}: {kind} has no input {entry['name']!r}"
            assert entry["type"] == sockets[entry["name"]][0], f"{path.name}: {kind}.{entry['name']} type"
            if entry["link"] is not None:
                _, src, src_slot, dst, dst_slot, link_type = links[entry["link"]]
                assert (dst, dst_slot) == (node["id"], slot), f"{path.name}: link {entry['link']} target"
                assert defs[nodes[src]["type"]][1][src_slot] == link_type == entry["type"], f"{path.name}: link types"
        connected = {e["name"] for e in node["inputs"] if e["link"] is not None}
        missing = [n for n, (_, optional) in sockets.items() if not optional and n not in connected]
        assert not missing, f"{path.name}: {kind} (node {node['id']}) leaves required inputs open: {missing}"
        assert len(node.get("widgets_values", [])) == widget_value_count(kind, inputs), (
            f"{path.name}: {kind} (node {node['id']}) has {len(node.get('widgets_values', []))} widget values, "
            f"expected {widget_value_count(kind, inputs)}")
        _check_widget_values(path.name, kind, inputs, node.get("widgets_values", []))
        assert [o["type"] for o in node["outputs"]] == list(outputs), f"{path.name}: {kind} outputs"
        if kind in output_names():
            assert tuple(o["name"] for o in node["outputs"]) == output_names()[kind], f"{path.name}: {kind} names"
    for link_id, src, src_slot, dst, dst_slot, _link_type in wf["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"], f"{path.name}: link {link_id} not on its output"
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id


def _check_widget_values(name, kind, inputs, values):
    values = list(values)
    for input_name, input_kind, _, options in inputs:
        if not is_widget(input_kind):
            continue
        value = values.pop(0)
        if isinstance(input_kind, list) and input_kind and kind not in BUILTINS:
            if input_name not in ("unet_name", "mllm_name", "vae_name"):  # the user's files
                assert value in input_kind, f"{name}: {kind}.{input_name}={value!r} not in {input_kind}"
        if input_kind in ("INT", "FLOAT") and "min" in options:
            assert options["min"] <= value <= options["max"], f"{name}: {kind}.{input_name}={value} out of range"
        values = values[EXTRA_WIDGET_VALUES.get(kind, {}).get(input_name, 0):]
        if input_kind == "INT" and (options.get("control_after_generate") or input_name in ("seed", "noise_seed")):
            assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")


@pytest.mark.parametrize("path", api_files(), ids=lambda p: p.name)
def test_api_workflow_matches_the_node_definitions(path):
    prompt = json.loads(path.read_text(encoding="utf-8"))
    defs = definitions()
    assert prompt, f"{path.name} is empty"
    for node_id, node in prompt.items():
        kind = node["class_type"]
        assert kind in defs, f"{path.name}: node type {kind} is neither in the pack nor in BUILTINS"
        inputs, _ = defs[kind]
        known = {n: (t, optional) for n, t, optional, _ in inputs}
        for name, value in node["inputs"].items():
            assert name in known, f"{path.name}: {kind} has no input {name!r}"
            expected, _ = known[name]
            if is_widget(expected):
                assert not isinstance(value, list), f"{path.name}: {kind}.{name} is a widget, not a link"
            else:
                src, slot = value
                assert src in prompt, f"{path.name}: {kind}.{name} links to missing node {src}"
                assert defs[prompt[src]["class_type"]][1][slot] == expected, f"{path.name}: {kind}.{name} link type"
        missing = [n for n, (_, optional) in known.items() if not optional and n not in node["inputs"]]
        assert not missing, f"{path.name}: {kind} (node {node_id}) lacks required inputs {missing}"


def test_the_api_workflow_is_the_basic_ui_workflow():
    ui = json.loads((WORKFLOWS / "step1x_edit_basic.json").read_text(encoding="utf-8"))
    api = json.loads((API_WORKFLOWS / "step1x_edit_api.json").read_text(encoding="utf-8"))
    ui_types = {str(n["id"]): n["type"] for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    assert ui_types == {k: v["class_type"] for k, v in api.items()}


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_workflows_hold_no_machine_paths():
    """File widgets hold names relative to ComfyUI's model folders, never absolute paths."""
    absolute = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")
    for path in all_workflow_files():
        found = [v for v in _strings(json.loads(path.read_text(encoding="utf-8"))) if absolute.match(v)]
        assert not found, f"{path.name} holds machine paths: {found}"


def _rect(node) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node with its title bar, in graph coordinates."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: p.name)
def test_nodes_do_not_overlap_and_every_link_runs_left_to_right(path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in wf["nodes"]}
    rects = {i: _rect(n) for i, n in nodes.items()}
    for a in rects:
        for b in rects:
            if a < b:
                (l1, t1, r1, b1), (l2, t2, r2, b2) = rects[a], rects[b]
                assert r1 <= l2 or r2 <= l1 or b1 <= t2 or b2 <= t1, f"{path.name}: nodes {a} and {b} overlap"
    for link_id, src, _, dst, _, _ in wf["links"]:
        assert rects[src][2] < rects[dst][0], f"{path.name}: link {link_id} ({src} -> {dst}) runs backwards"


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: p.name)
def test_every_ui_workflow_is_saved_with_a_view(path):
    ds = json.loads(path.read_text(encoding="utf-8"))["extra"]["ds"]
    assert 0.3 <= ds["scale"] <= 1.5 and len(ds["offset"]) == 2
