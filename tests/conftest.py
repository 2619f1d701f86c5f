"""Shared test fixtures: the reference sets (``reference_sets.py``), tiny seeded models and deterministic CPU math.

Test modules request these by name; plain helpers live in ``helpers.py``, ``node_support.py`` and
``tiny_qwen.py``. Every tiny model set is built once per session in pytest's temporary folders."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

from node_support import PACK_NAME, load_pack, run_node, tokenizer_for_tests, write_tiny_models
from reference_sets import reference_folder

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)


def _env_dir(name: str, what: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set; point it at {what} to run this test")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"{name}={value} is not a folder; point it at {what}")
    return path


def _reference_set(name: str, root) -> Path:
    try:
        return reference_folder(name, root)
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def reference_root(tmp_path_factory) -> Path:
    """Where this session rebuilds the reference sets (``official/``, ``v12/``, ``regione/`` side by side)."""
    return tmp_path_factory.mktemp("reference-sets")


@pytest.fixture(scope="session")
def official_dir(reference_root) -> Path:
    """The folder of tensors produced by the official implementation (``fixtures/official``);
    ``STEP1X_FIXTURES`` overrides it."""
    return _reference_set("official", reference_root)


@pytest.fixture(scope="session")
def v12_dir(reference_root) -> Path:
    """The folder of tensors produced by the v1.2 reference (``fixtures/v12``); ``STEP1X_FIXTURES_V12``
    overrides it."""
    return _reference_set("v12", reference_root)


@pytest.fixture(scope="session")
def regione_dir(reference_root) -> Path:
    """The folder of per-step records produced by the RegionE reference (``fixtures/regione``);
    ``STEP1X_FIXTURES_REGIONE`` overrides it."""
    return _reference_set("regione", reference_root)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """A folder with the real Qwen2.5 tokenizer files (vocab.json, merges.txt, tokenizer_config.json):
    ``STEP1X_QWEN_TOKENIZER``, else the copy bundled with the ComfyUI checkout in ``COMFYUI_PATH``."""
    if not os.environ.get("STEP1X_QWEN_TOKENIZER") and os.environ.get("COMFYUI_PATH"):
        from step1x.checkpoints.model_files import comfy_tokenizer

        bundled = comfy_tokenizer(Path(os.environ["COMFYUI_PATH"]))
        if bundled is not None:
            return bundled
    return _env_dir("STEP1X_QWEN_TOKENIZER", "a folder with the Qwen2.5 tokenizer files (or COMFYUI_PATH at a "
                    "ComfyUI checkout, whose comfy/text_encoders/qwen25_tokenizer is used)")


# ---------------------------------------------------------------------------------------- library: tiny DiT


@pytest.fixture(scope="session")
def tiny_dit():
    """A tiny v1.1 DiT with seeded random weights (the parity fixtures' architecture)."""
    from step1x.models.configs import TINY_DIT, with_version
    from step1x.models.model import Step1XEdit

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Step1XEdit(with_version(TINY_DIT, "v1.1"), dtype=torch.float32).eval()


@pytest.fixture()
def tiny_text():
    """Cond and uncond MLLM embeddings for the tiny DiT (width 48, 24 tokens)."""
    from step1x.sampling.denoise import TextConditioning

    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 24, 48, generator=g)
    mask = torch.zeros(2, 24, dtype=torch.long)
    mask[0, :17] = 1
    mask[1, :6] = 1
    emb = emb * mask.unsqueeze(-1)
    return TextConditioning(emb[:1], mask[:1]), TextConditioning(emb[1:], mask[1:])


@pytest.fixture(scope="session")
def v12_models(tmp_path_factory, v12_dir) -> Path:
    """The v1.2 reference set's tiny transformer and VAE as a diffusers model folder (transformer/, vae/)."""
    from diffusers_folders import v12_model_folder

    return v12_model_folder(tmp_path_factory.mktemp("Step1X-Edit-v1p2"), v12_dir)


# ----------------------------------------------------------------------------- command line: tiny model set


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A models folder in the standalone layout under the official names (v1.1 DiT, VAE, Qwen2.5-VL folder),
    built with the run-time stand-in tokenizer, so the command-line tests need no downloaded files."""
    from step1x.tiny import build_tiny_models
    from step1x.tiny_tokenizer import write_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(root / "models", write_tiny_tokenizer(root / "tokenizer"))
    return root / "models"


@pytest.fixture(scope="session")
def tiny_v12_folder(tmp_path_factory) -> Path:
    """A tiny Step1X-Edit v1.2 model folder in the released diffusers layout (sharded transformer/ with its
    index, vae/, text_encoder/ with a tied LM head and its generation config, processor/), built with the real
    tokenizer when STEP1X_QWEN_TOKENIZER is set, else the stand-in."""
    from step1x.checkpoints.model_files import MODEL_FOLDERS
    from step1x.tiny import build_tiny_model_folder

    root = tmp_path_factory.mktemp("v12-folder")
    tokenizer = tokenizer_for_tests(root)
    return build_tiny_model_folder(root / MODEL_FOLDERS["v1.2"][1], tokenizer, version="v1.2")


@pytest.fixture(scope="session")
def tiny_v11_diffusers_folder(tmp_path_factory) -> Path:
    """The tiny v1.1 model set of ``tiny_models`` (same seeds) as a Step1X-Edit-v1p1-diffusers model folder."""
    from step1x.checkpoints.model_files import MODEL_FOLDERS
    from step1x.tiny import build_tiny_model_folder
    from step1x.tiny_tokenizer import write_tiny_tokenizer

    root = tmp_path_factory.mktemp("v11-diffusers-folder")
    return build_tiny_model_folder(root / MODEL_FOLDERS["v1.1-diffusers"][1], write_tiny_tokenizer(root / "tokenizer"),
                                   version="v1.1")


# ---------------------------------------------------------------- encoder: image processor, tiny Qwen2.5-VL


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, qwen_tokenizer_dir):
    """The tiny Qwen2.5-VL as an HF folder and as ComfyUI-layout single files (see ``tiny_qwen.py``)."""
    from tiny_qwen import build_assets

    return build_assets(tmp_path_factory.mktemp("tiny_qwen"), qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def image_processor():
    """The Qwen2.5-VL image processor the encoder builds (no files needed)."""
    from step1x.encoder import make_image_processor

    return make_image_processor()


@pytest.fixture(scope="session")
def tiny_encoder(tiny_assets):
    """The tiny encoder loaded from its HF folder in float32."""
    from tiny_qwen import load_tiny

    return load_tiny(tiny_assets.folder, tiny_assets)


# ---------------------------------------------------------------------------- nodes: the pack on tiny files


@pytest.fixture(scope="session")
def pack():
    """The repository root imported as a package, as ComfyUI imports a custom node folder."""
    return load_pack()


@pytest.fixture(scope="session")
def bridge(pack):
    """The pack's ComfyUI bridge, here in its headless form, with the CPU as its main device even where a GPU
    is present: the node tests compare with float32 CPU math at tight tolerances."""
    module = importlib.import_module(f"{PACK_NAME}.nodes._comfy")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "main_device", lambda: torch.device("cpu"))
        yield module


@pytest.fixture(scope="session")
def model_names(tmp_path_factory, bridge):
    """Tiny model files in a models folder registered with the headless bridge; the file names by role."""
    root = tmp_path_factory.mktemp("models")
    names = write_tiny_models(root, tokenizer_for_tests(tmp_path_factory.mktemp("tokenizer")))
    for kind in ("diffusion_models", "vae", "text_encoders"):
        bridge.register_model_folder(kind, root / kind)
    yield names
    bridge.clear_model_folders()


@pytest.fixture(scope="session")
def dit(pack, model_names):
    """The tiny DiT from the DiT loader node."""
    return run_node(pack, "Step1XEditDiTLoader", unet_name=model_names["dit"], weight_dtype="default",
                    attention="auto")[0]


@pytest.fixture(scope="session")
def vae(pack, model_names):
    """The tiny VAE from the VAE loader node."""
    return run_node(pack, "Step1XEditVAELoader", vae_name=model_names["vae"])[0]


@pytest.fixture(scope="session")
def mllm(pack, model_names):
    """The tiny MLLM from the MLLM loader node, in float32."""
    return run_node(pack, "Step1XEditMLLMLoader", mllm_name=model_names["mllm"], dtype="fp32", device="default")[0]
