"""Bad GGUF input gets an error that names the file and the fix: a truncated or damaged file, a file that
is no GGUF, a GGUF of another architecture (FLUX.1-dev, SD1.x), a quantisation type the pack or the gguf
package does not read, a file that misses tensors; and in the headless DiT loader node, the same errors and
the GGUF files in the list."""

import shutil

import gguf
import numpy as np
import pytest
import torch

from helpers import flux_dev_state
from node_support import run_node
from step1x.checkpoints.gguf_convert import save_gguf
from step1x.checkpoints.loading import inspect_dit, load_dit
from step1x.checkpoints.safetensors_file import CheckpointError
from step1x.models.configs import TINY_DIT, with_version
from step1x.models.model import Step1XEdit

PARAMS = with_version(TINY_DIT, "v1.1")


@pytest.fixture(scope="module")
def state():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Step1XEdit(PARAMS).state_dict()


@pytest.fixture(scope="module")
def good(tmp_path_factory, state):
    return save_gguf(state, tmp_path_factory.mktemp("good") / "step1x_tiny-Q8_0.gguf", "Q8_0", params=PARAMS).path


def write_raw_gguf(path, arch: str, tensors: dict[str, tuple[np.ndarray, str | None]]):
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (data, raw_type) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=None if raw_type is None else gguf.GGMLQuantizationType[raw_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_a_truncated_file_is_named_as_truncated(good, tmp_path, keep):
    cut = tmp_path / good.name
    data = good.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    for read in (inspect_dit, load_dit):
        with pytest.raises(CheckpointError, match=f"{cut}.* is truncated or damaged .* download or convert it again"):
            read(cut)


@pytest.mark.parametrize("content, detail", [(b"", "it is empty"), (b'{"not": "gguf"}' * 8, "download it again")])
def test_a_file_that_is_no_gguf_says_so(tmp_path, content, detail):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"model.gguf is not a GGUF file .*{detail}"):
        load_dit(path)


def test_a_flux_dev_gguf_is_named_and_the_way_to_make_a_step1x_one_given(tmp_path, state):
    path = save_gguf(flux_dev_state(state), tmp_path / "flux1-dev-Q8_0.gguf", "Q8_0").path
    with pytest.raises(CheckpointError, match=r"flux1-dev-Q8_0.gguf is a FLUX.1-dev style DiT \(no Step1X connector\), "
                                              r"not a Step1X-Edit DiT.* This file is a GGUF: .*step1x quantize"):
        load_dit(path)


def test_an_sd_gguf_is_named_by_its_architecture(tmp_path):
    rng = np.random.default_rng(0)
    path = write_raw_gguf(tmp_path / "sd15-Q8_0.gguf", "sd1", {
        "input_blocks.0.0.weight": (rng.standard_normal((320, 4, 3, 3)).astype(np.float32), None),
        "time_embed.0.weight": (gguf.quants.quantize(rng.standard_normal((1280, 320)).astype(np.float32),
                                                     gguf.GGMLQuantizationType.Q8_0), "Q8_0"),
    })
    with pytest.raises(CheckpointError, match="sd15-Q8_0.gguf is a GGUF of a 'sd1' model .*not of the Step1X-Edit DiT"):
        inspect_dit(path)


def test_a_type_the_pack_does_not_read_is_named_with_the_supported_ones(tmp_path, state):
    tensors = {k: (v.numpy(), None) for k, v in state.items() if k != "double_blocks.0.img_mlp.2.weight"}
    tensors["double_blocks.0.img_mlp.2.weight"] = (np.zeros((64, 256 // 32 * 18), dtype=np.uint8), "IQ4_NL")
    path = write_raw_gguf(tmp_path / "iq4.gguf", "flux", tensors)
    with pytest.raises(CheckpointError, match=r"iq4.gguf: tensor double_blocks.0.img_mlp.2.weight is stored as IQ4_NL, "
                                              r"which this pack does not read. Supported types: F32, F16, BF16, Q8_0"):
        load_dit(path)


def test_a_type_number_the_gguf_package_does_not_know_asks_for_an_update(tmp_path, good):
    data = bytearray(good.read_bytes())
    name = b"double_blocks.0.img_mlp.2.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at: at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at: type_at + 4], "little") == 8  # Q8_0
    data[type_at: type_at + 4] = (250).to_bytes(4, "little")
    path = tmp_path / "future.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="future.gguf has a tensor of a quantisation type the installed gguf "
                                              r"package does not know .*pip install -U gguf"):
        load_dit(path)


def test_a_file_missing_tensors_loads_nothing_and_says_which(tmp_path, state):
    partial = {k: v for k, v in state.items() if k != "single_blocks.1.linear1.weight"}
    path = save_gguf(partial, tmp_path / "partial.gguf", "Q8_0", params=PARAMS).path
    with pytest.raises(CheckpointError, match=r"partial.gguf does not match the model it describes: 1 missing "
                                              r"\(e.g. single_blocks.1.linear1.weight\)"):
        load_dit(path)


def test_a_renamed_gguf_is_still_read_as_gguf(tmp_path, good):
    renamed = tmp_path / "step1x.safetensors"
    shutil.copyfile(good, renamed)
    assert inspect_dit(renamed).version == "v1.1"


# ------------------------------------------------------------------------------------------------ nodes


@pytest.fixture()
def gguf_folder(bridge, model_names, good, tmp_path, monkeypatch):
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copyfile(good, folder / good.name)
    (folder / "broken.gguf").write_bytes(good.read_bytes()[:1000])
    folders = dict(bridge._HEADLESS_FOLDERS)
    folders["diffusion_models"] = [*folders.get("diffusion_models", []), folder]
    monkeypatch.setattr(bridge, "_HEADLESS_FOLDERS", folders)
    return folder


def test_the_dit_loader_lists_gguf_files_beside_safetensors(pack, model_names, gguf_folder):
    choices = pack.NODE_CLASS_MAPPINGS["Step1XEditDiTLoader"].INPUT_TYPES()["required"]["unet_name"][0]
    assert {"step1x_tiny-Q8_0.gguf", "broken.gguf", model_names["dit"]} <= set(choices)
    assert choices == sorted(choices)


def test_the_dit_loader_node_loads_a_gguf_with_quantised_blocks(pack, gguf_folder):
    dit = run_node(pack, "Step1XEditDiTLoader", unet_name="step1x_tiny-Q8_0.gguf", weight_dtype="default",
                   attention="auto")[0]
    layer = dit.model.double_blocks[0].img_attn.qkv
    assert layer.qtype.name == "Q8_0" and layer.weight.dtype == torch.uint8


def test_the_dit_loader_node_names_a_broken_gguf(pack, gguf_folder):
    with pytest.raises(ValueError, match="broken.gguf is truncated or damaged"):  # the pack's own CheckpointError
        run_node(pack, "Step1XEditDiTLoader", unet_name="broken.gguf", weight_dtype="default", attention="auto")
