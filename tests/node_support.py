"""Plain helpers for the node tests (no fixtures, no tests: the fixtures are in ``conftest.py``): loading
the pack the way ComfyUI does, writing tiny model files in ComfyUI's folder layout, calling nodes, and the
example workflows with the ComfyUI built-ins they use."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from helpers import flux_dev_state, sd_vae_state

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "step1x_edit_pack"
WORKFLOWS = ROOT / "workflows"

BUILTINS = {
    # class_type: (inputs in order as (name, type), output types). A list type is a combo (a widget).
    "LoadImage": ([("image", [])], ("IMAGE", "MASK")),
    "SaveImage": ([("images", "IMAGE"), ("filename_prefix", "STRING")], ()),
    "VAELoader": ([("vae_name", [])], ("VAE",)),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], ("IMAGE",)),
    "EmptySD3LatentImage": ([("width", "INT"), ("height", "INT"), ("batch_size", "INT")], ("LATENT",)),
    "KSampler": ([("model", "MODEL"), ("seed", "INT"), ("steps", "INT"), ("cfg", "FLOAT"), ("sampler_name", []),
                  ("scheduler", []), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT"), ("denoise", "FLOAT")], ("LATENT",)),
    "SamplerCustomAdvanced": ([("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                               ("latent_image", "LATENT")], ("LATENT", "LATENT")),
    "CFGGuider": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("cfg", "FLOAT")],
                  ("GUIDER",)),
    "KSamplerSelect": ([("sampler_name", [])], ("SAMPLER",)),
    "RandomNoise": ([("noise_seed", "INT")], ("NOISE",)),
}
"""The ComfyUI built-in nodes the workflows may use, with the outputs they use (checked against the real ComfyUI in
test_comfyui_server, where a newer ComfyUI may add outputs after these: SaveImage returns its IMAGE in 0.33)."""


def load_pack():
    """Import the repository root as a package, as ComfyUI imports a custom node folder."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def tokenizer_for_tests(tmp: Path) -> Path:
    """The real Qwen2.5 tokenizer when ``STEP1X_QWEN_TOKENIZER`` names one, else the library's stand-in
    (written into ``tmp``), which tokenises the official template like the real one."""
    value = os.environ.get("STEP1X_QWEN_TOKENIZER")
    if value and Path(value).is_dir():
        return Path(value)
    return lib("tiny_tokenizer").write_tiny_tokenizer(tmp / "qwen25_tokenizer_stand_in")


def lib(name: str):
    """A module of the pack's own copy of the library (``step1x.<name>``)."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.step1x.{name}")


def write_tiny_models(root: Path, tokenizer: Path) -> dict[str, str]:
    """ComfyUI-style models folder with tiny random models; returns the file names by role."""
    from safetensors.torch import save_file

    configs, loading = lib("models.configs"), lib("checkpoints.loading")
    tiny, tiny_qwen = lib("tiny"), lib("encoder.tiny")
    Step1XEdit, AutoEncoder = lib("models.model").Step1XEdit, lib("models.autoencoder").AutoEncoder
    for sub in ("diffusion_models", "vae", "text_encoders"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    params, narrow = tiny.tiny_dit_params(tiny_qwen.TINY_QWEN25_VL["hidden_size"]), tiny.tiny_dit_params(48)
    with torch.random.fork_rng(devices=[]):  # seeded weights, and the global generator left as it was
        torch.manual_seed(0)
        state = Step1XEdit(params).state_dict()
        narrow_state = Step1XEdit(narrow).state_dict()
        vae_state = AutoEncoder(configs.TINY_VAE).state_dict()
    loading.save_with_config(state, root / "diffusion_models" / "step1x_tiny.safetensors", params)
    loading.save_with_config(narrow_state, root / "diffusion_models" / "step1x_tiny_w48.safetensors", narrow)
    save_file(flux_dev_state(state), str(root / "diffusion_models" / "flux1-dev-tiny.safetensors"))
    loading.save_with_config(vae_state, root / "vae" / "ae_tiny.safetensors", configs.TINY_VAE)
    save_file(sd_vae_state(), str(root / "vae" / "sdxl_vae.safetensors"))
    tiny_qwen.build_tiny_qwen_folder(root / "text_encoders" / "tiny-qwen25-vl", tokenizer)
    return {"dit": "step1x_tiny.safetensors", "dit_w48": "step1x_tiny_w48.safetensors",
            "flux": "flux1-dev-tiny.safetensors", "vae": "ae_tiny.safetensors", "sdxl_vae": "sdxl_vae.safetensors",
            "mllm": "tiny-qwen25-vl"}


API_WORKFLOWS = WORKFLOWS / "api"
"""API-format workflows live in a subfolder: ComfyUI lists every ``workflows/*.json`` as a template, and the
template browser loads only the UI format."""


def all_workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.rglob("*.json"))


def ui_files() -> list[Path]:
    """The workflows in the UI format (with a ``nodes`` list)."""
    return [p for p in all_workflow_files() if "nodes" in json.loads(p.read_text(encoding="utf-8"))]


def api_files() -> list[Path]:
    """The workflows in the API format (a prompt: node id -> class_type and inputs)."""
    return [p for p in all_workflow_files() if "nodes" not in json.loads(p.read_text(encoding="utf-8"))]


def template_files() -> list[Path]:
    """The workflows ComfyUI offers as the pack's templates: the JSON files directly in ``workflows/``."""
    return sorted(WORKFLOWS.glob("*.json"))


def run_node(pack, node_id: str, **inputs):
    """Call a node the way ComfyUI's executor does: a fresh instance, its FUNCTION with keyword inputs."""
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    return getattr(cls(), cls.FUNCTION)(**inputs)


def fake_embeds(pack, hidden: int = 64, working=(64, 48), batch: int = 1, length: int = 24, seed: int = 0):
    """Instruction embeddings without running the MLLM (random, with the official mask layout)."""
    sockets = importlib.import_module(f"{PACK_NAME}.nodes.sockets")
    sampling = lib("sampling.denoise")
    g = torch.Generator().manual_seed(seed)
    sides = []
    for valid in (17, 6):
        emb = torch.zeros(batch, length, hidden)
        emb[:, :valid] = torch.randn(batch, valid, hidden, generator=g)
        mask = torch.zeros(batch, length, dtype=torch.long)
        mask[:, :valid] = 1
        sides.append(sampling.TextConditioning(emb.to(torch.bfloat16), mask))
    return sockets.InstructionEmbeds(sides[0], sides[1], working, "random test embeddings")


STEPS = 3


def bind(pack, dit, embeds):
    return run_node(pack, "Step1XEditConnector", model=dit, embeddings=embeds)[0]


def sample(pack, dit, conditioning, seed=1, steps=STEPS, cfg=6.0, renorm_threshold=0.93, denoise=1.0, batch_size=1,
           **optional):
    return run_node(pack, "Step1XEditSampler", model=dit, conditioning=conditioning, seed=seed, steps=steps, cfg=cfg,
                    renorm_threshold=renorm_threshold, denoise=denoise, batch_size=batch_size, **optional)[0]


def image(width, height, batch=1, seed=0):
    """A seeded IMAGE tensor (batch, height, width, 3) in [0, 1]."""
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def random_latent(batch=1, seed=0):
    """A seeded 16-channel LATENT tensor of a 64x48 image (batch, 16, 6, 8)."""
    return torch.randn(batch, 16, 6, 8, generator=torch.Generator().manual_seed(seed))
