"""The native path inside the real ComfyUI: Step1X-Edit as a MODEL with CONDITIONING, sampled by ComfyUI's own
SamplerCustomAdvanced and KSampler through POST /prompt, compared with the pack's own Sampler on tiny models
(CPU, float32). Latents come back through ComfyUI's SaveLatent.

Also, in a ComfyUI process without a server: texts of unequal length reach the model exactly as given, and
ComfyUI's latent previewer gets a preview at every step. Step1X-Edit v1.2 (tiny model folder): SamplerCustomAdvanced
with the Sigmas node on the model reproduces the pack's v1.2 Sampler for an edit whose cond and uncond texts differ
in length, and KSampler comes within the README's figure.

Needs ``COMFYUI_PATH`` (a ComfyUI checkout) and optionally ``COMFYUI_PYTHON`` (its interpreter), as
``test_comfyui_server.py`` does; the server (``comfy_server.py``) takes the first free port of
``STEP1X_COMFYUI_PORTS`` when set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_server import (
    COMFYUI,
    IMAGE_SIZE,
    MODEL_NAMES,
    messages,
    prepare_base,
    require_comfyui,
    run_script,
    saved_tensors,
    serve,
)
from node_support import WORKFLOWS, lib

require_comfyui("to test the native MODEL path inside the real ComfyUI")

EXACT = 1e-5
"""Max abs difference of raw latents between ComfyUI's samplers on the native MODEL and the pack's Sampler."""
COMBINED = 2e-5
"""Max abs difference after ConditioningCombine of the positive with itself. ComfyUI then evaluates the two positive
entries and the negative as one batch of 3 rows instead of 2, and the CPU's float32 matrix products round a row
differently with the number of rows beside it (MKL: ``x @ w.T`` of the same row differs by 2e-7..4e-7 between 2
and 3 rows; the DiT's first difference is the connector's first Linear). Measured: 1.0e-5 on ComfyUI 0.3.64 and
0.33.0 (4 steps, cfg 6); the two positive rows come out identical, so their average is exact."""
STEPS, SEED, CFG, SIZE_LEVEL = 4, 3, 6.0, 64
LORA = "tiny_layouts_lora.safetensors"
LORA_STRENGTH = 0.8
V12 = "Step1X-Edit-v1p2"
KSAMPLER_V12 = 1e-5
"""Max abs difference of KSampler (euler, simple, after Step1X-Edit Model Sampling) from the pack's v1.2 Sampler
(the README's figure for v1.2)."""


# ------------------------------------------------------------------------------------------------ server


def _lora_file(path: Path, params) -> None:
    """A LoRA touching one layer per naming layout the pack reads: kohya, diffusers (q/k/v and the single
    blocks' mlp kept apart), DiffSynth-Studio, PEFT under base_model.model., and a connector layer."""
    with torch.device("meta"):
        shapes = lib("checkpoints.lora").linear_shapes(lib("models.model").Step1XEdit(params))
    g = torch.Generator().manual_seed(7)
    tensors = {}

    def module(name, rows, cols, down="lora_down.weight", up="lora_up.weight", alpha=None):
        tensors[f"{name}.{down}"] = torch.randn(2, cols, generator=g) * 0.2
        tensors[f"{name}.{up}"] = torch.randn(rows, 2, generator=g) * 0.2
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)

    out, inp = shapes["double_blocks.0.img_attn.proj"]
    module("lora_unet_double_blocks_0_img_attn_proj", out, inp, alpha=1.0)
    hidden = shapes["double_blocks.1.img_attn.qkv"][1]
    for part in ("to_q", "to_k", "to_v"):
        module(f"transformer.transformer_blocks.1.attn.{part}", hidden, hidden, "lora_A.weight", "lora_B.weight")
    out, inp = shapes["single_blocks.0.linear1"]
    module("transformer.single_transformer_blocks.0.proj_mlp", out - 3 * inp, inp, "lora_A.weight", "lora_B.weight")
    out, inp = shapes["double_blocks.0.txt_attn.qkv"]
    module("blocks.0.attn.b_to_qkv", out, inp, "lora_A.weight", "lora_B.weight", alpha=4.0)
    out, inp = shapes["single_blocks.1.linear2"]
    module("base_model.model.single_blocks.1.linear2", out, inp, "lora_A.weight", "lora_B.weight")
    out, inp = shapes["connector.S.input_embedder"]
    module("diffusion_model.connector.S.input_embedder", out, inp)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_native_base")
    prepare_base(base)
    (base / "models" / "loras").mkdir()
    dit = base / "models" / "diffusion_models" / MODEL_NAMES["dit"]
    params = lib("checkpoints.loading").inspect_dit(dit).params
    _lora_file(base / "models" / "loras" / LORA, params)
    lib("tiny").build_tiny_model_folder(base / "models" / "diffusion_models" / V12,
                                        Path(COMFYUI) / "comfy" / "text_encoders" / "qwen25_tokenizer", version="v1.2")
    with serve(base) as srv:
        yield srv


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def base_prompt() -> dict:
    """Loaders, the image, and the native encode (positive, negative, latent at the working size)."""
    loader = {"unet_name": MODEL_NAMES["dit"], "weight_dtype": "default", "attention": "sdpa"}
    return {
        "1": node("Step1XEditDiTLoader", **loader),
        "2": node("Step1XEditMLLMLoader", mllm_name=MODEL_NAMES["mllm"], dtype="fp32", device="default"),
        "3": node("Step1XEditVAELoader", vae_name=MODEL_NAMES["vae"]),
        "4": node("LoadImage", image="example.png"),
        "11": node("Step1XEditModelLoader", **loader),
        "12": node("Step1XEditEncode", mllm=["2", 0], instruction="make it red", negative_prompt="",
                   size_level=SIZE_LEVEL, image=["4", 0], vae=["3", 0]),
    }


def pack_sampler(prompt: dict, *, denoise=1.0, batch_size=1, model="1", text_to_image=False, **optional) -> None:
    """The pack's own graph (Instruction Encode -> Connector -> Sampler) -> SaveLatent 'pack'."""
    image = {} if text_to_image else {"image": ["4", 0]}
    prompt["5"] = node("Step1XEditInstructionEncode", mllm=["2", 0], instruction="make it red", negative_prompt="",
                       size_level=SIZE_LEVEL, **image)
    prompt["6"] = node("Step1XEditConnector", model=["1", 0], embeddings=["5", 0])
    reference = {} if text_to_image else {"reference_image": ["4", 0], "vae": ["3", 0]}
    prompt["7"] = node("Step1XEditSampler", model=[model, 0], conditioning=["6", 0], seed=SEED, steps=STEPS, cfg=CFG,
                       renorm_threshold=0.93, denoise=denoise, batch_size=batch_size, **reference, **optional)
    prompt["8"] = node("SaveLatent", samples=["7", 0], filename_prefix="latents/pack")


def custom_sampler(prompt: dict, *, latent=("12", 2), positive=("12", 0), negative=("12", 1), model="11",
                   denoise=1.0, sampler="euler", prefix="native", sigmas_of_model=False) -> None:
    """RandomNoise + CFGGuider + KSamplerSelect + Step1X-Edit Sigmas -> SamplerCustomAdvanced -> SaveLatent."""
    prompt["13"] = node("RandomNoise", noise_seed=SEED)
    prompt["14"] = node("CFGGuider", model=[model, 0], positive=list(positive), negative=list(negative), cfg=CFG)
    prompt["15"] = node("KSamplerSelect", sampler_name=sampler)
    on_model = {"model": [model, 0]} if sigmas_of_model else {}
    prompt["16"] = node("Step1XEditSigmas", latent=list(latent), steps=STEPS, denoise=denoise, **on_model)
    prompt["17"] = node("SamplerCustomAdvanced", noise=["13", 0], guider=["14", 0], sampler=["15", 0],
                        sigmas=["16", 0], latent_image=list(latent))
    prompt["18"] = node("SaveLatent", samples=["17", 0], filename_prefix=f"latents/{prefix}")


def ksampler(prompt: dict, *, sampler="euler", scheduler="simple", steps=STEPS, latent=("12", 2), model="11",
             prefix="ksampler") -> None:
    """Step1X-Edit Model Sampling (the latent's shift) -> KSampler -> SaveLatent."""
    prompt["20"] = node("Step1XEditModelSampling", model=[model, 0], latent=list(latent))
    prompt["21"] = node("KSampler", model=["20", 0], seed=SEED, steps=steps, cfg=CFG, sampler_name=sampler,
                        scheduler=scheduler, positive=["12", 0], negative=["12", 1], latent_image=list(latent),
                        denoise=1.0)
    prompt["22"] = node("SaveLatent", samples=["21", 0], filename_prefix=f"latents/{prefix}")


def run(server, prompt: dict) -> dict:
    entry = server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


def latent(server, entry: dict, node_id: str) -> torch.Tensor:
    saved = entry["outputs"][node_id]["latents"][0]
    return load_file(str(server.base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def assert_exact(native: torch.Tensor, pack: torch.Tensor) -> float:
    assert native.shape == pack.shape
    gap = (native - pack).abs().max().item()
    print(f"native vs the pack's Sampler: {gap:.3g}")
    assert gap <= EXACT, f"native path differs from the pack's Sampler by {gap:.3g}"
    return gap


# --------------------------------------------------------------------------------- exactness vs the pack


@pytest.fixture(scope="module")
def edit(server):
    prompt = base_prompt()
    pack_sampler(prompt)
    custom_sampler(prompt)
    ksampler(prompt)
    entry = run(server, prompt)
    return {name: latent(server, entry, node_id) for name, node_id in
            (("pack", "8"), ("native", "18"), ("ksampler", "22"))}


def test_samplercustomadvanced_with_the_official_sigmas_reproduces_the_pack_sampler_for_an_edit(server, edit):
    assert_exact(edit["native"], edit["pack"])
    assert "Requested to load Step1XEditModel" in server.log.read_text(errors="replace")


def test_ksampler_euler_simple_after_model_sampling_is_within_the_stated_tolerance(edit):
    assert_exact(edit["ksampler"], edit["pack"])


@pytest.fixture(scope="module")
def edit_v12(server):
    """A v1.2 edit: the native Encode (v1.2 conditioning from the model folder's encoder; 'make it red' and the empty
    negative prompt give texts of different lengths) sampled by SamplerCustomAdvanced and KSampler, and the pack's
    v1.2 Sampler given the same reference latent (the VAE's mean: the Sampler's own posterior sample of an image
    comes from its seed, which the native Encode does not have)."""
    prompt = base_prompt()
    loader = {"unet_name": V12, "weight_dtype": "default", "attention": "sdpa"}
    prompt["1"] = node("Step1XEditDiTLoader", **loader)
    prompt["11"] = node("Step1XEditModelLoader", **loader)
    prompt["2"]["inputs"]["mllm_name"] = V12
    prompt["3"] = node("Step1XEditVAELoader", vae_name=f"{V12}/vae")
    pack_sampler(prompt, reference_latent=["12", 2])
    del prompt["7"]["inputs"]["reference_image"], prompt["7"]["inputs"]["vae"]
    custom_sampler(prompt, sigmas_of_model=True)
    ksampler(prompt)
    entry = run(server, prompt)
    return {name: latent(server, entry, node_id) for name, node_id in
            (("pack", "8"), ("native", "18"), ("ksampler", "22"))}


def test_v12_samplercustomadvanced_with_the_models_sigmas_reproduces_the_pack_v12_sampler(edit_v12):
    gap = assert_exact(edit_v12["native"], edit_v12["pack"])
    print(f"v1.2 SamplerCustomAdvanced vs the pack's v1.2 Sampler: {gap:.3g}")


def test_v12_ksampler_euler_simple_is_within_the_stated_tolerance(edit_v12):
    gap = (edit_v12["ksampler"] - edit_v12["pack"]).abs().max().item()
    print(f"v1.2 KSampler euler/simple vs the pack's v1.2 Sampler: {gap:.3g}")
    assert gap <= KSAMPLER_V12


def test_v12_samples_with_a_negative_from_conditioning_zero_out(server):
    prompt = base_prompt()
    prompt["2"]["inputs"]["mllm_name"] = V12
    prompt["3"] = node("Step1XEditVAELoader", vae_name=f"{V12}/vae")
    prompt["11"] = node("Step1XEditModelLoader", unet_name=V12, weight_dtype="default", attention="sdpa")
    prompt["30"] = node("ConditioningZeroOut", conditioning=["12", 1])
    custom_sampler(prompt, negative=("30", 0), sigmas_of_model=True)
    out = latent(server, run(server, prompt), "18")  # the zeroed negative keeps its text positions and mask
    assert torch.isfinite(out).all()


def test_text_to_image_reproduces_the_pack_sampler(server):
    prompt = base_prompt()
    prompt["12"]["inputs"] = {k: v for k, v in prompt["12"]["inputs"].items() if k not in ("image", "vae")}
    prompt["30"] = node("EmptySD3LatentImage", width=64, height=48, batch_size=1)
    pack_sampler(prompt, text_to_image=True, init_latent=["30", 0])
    custom_sampler(prompt, latent=("30", 0))
    entry = run(server, prompt)
    assert_exact(latent(server, entry, "18"), latent(server, entry, "8"))


def test_img2img_reproduces_the_pack_sampler(server):
    prompt = base_prompt()
    pack_sampler(prompt, denoise=0.6)
    custom_sampler(prompt, denoise=0.6)
    entry = run(server, prompt)
    assert_exact(latent(server, entry, "18"), latent(server, entry, "8"))


def test_a_latent_batch_reproduces_the_pack_batch(server):
    prompt = base_prompt()
    prompt["30"] = node("RepeatLatentBatch", samples=["12", 2], amount=2)
    pack_sampler(prompt, batch_size=2)
    custom_sampler(prompt, latent=("30", 0))
    entry = run(server, prompt)
    native, pack = latent(server, entry, "18"), latent(server, entry, "8")
    assert native.shape[0] == 2 and not torch.equal(native[0], native[1])
    assert_exact(native, pack)


def test_lora_loader_model_only_equals_the_pack_lora_loader(server, edit):
    prompt = base_prompt()
    prompt["9"] = node("Step1XEditLoraLoader", model=["1", 0], lora_name=LORA, strength=LORA_STRENGTH)
    prompt["10"] = node("LoraLoaderModelOnly", model=["11", 0], lora_name=LORA, strength_model=LORA_STRENGTH)
    pack_sampler(prompt, model="9")
    custom_sampler(prompt, model="10")
    entry = run(server, prompt)
    native = latent(server, entry, "18")
    assert_exact(native, latent(server, entry, "8"))
    assert (native - edit["native"]).abs().max() > 1e-3, "the LoRA changes the result"
    assert "lora key not loaded" not in server.log.read_text(errors="replace")


def test_reference_latent_node_attaches_the_reference_as_the_encode_node_does(server, edit):
    prompt = base_prompt()
    del prompt["12"]["inputs"]["vae"]
    prompt["30"] = node("Step1XEditResize", image=["4", 0], size_level=SIZE_LEVEL, resample="lanczos")
    prompt["31"] = node("VAEEncode", pixels=["30", 0], vae=["3", 0])
    prompt["32"] = node("ReferenceLatent", conditioning=["12", 0], latent=["31", 0])
    prompt["33"] = node("ReferenceLatent", conditioning=["12", 1], latent=["31", 0])
    custom_sampler(prompt, latent=("31", 0), positive=("32", 0), negative=("33", 0))
    entry = run(server, prompt)
    torch.testing.assert_close(latent(server, entry, "18"), edit["native"], rtol=0, atol=1e-6)


def test_mask_edit_keeps_the_unmasked_latent_and_equals_the_pack_mask_edit(server):
    """Load Image's mask is 1 on the image's left half: ComfyUI's inpainting keeps the right half."""
    prompt = base_prompt()
    prompt["30"] = node("SetLatentNoiseMask", samples=["12", 2], mask=["4", 1])
    pack_sampler(prompt, mask=["4", 1])
    custom_sampler(prompt, latent=("30", 0))
    entry = run(server, prompt)
    native, pack = latent(server, entry, "18"), latent(server, entry, "8")
    reference = _encode_latent(server, prompt)
    half = native.shape[-1] // 2
    torch.testing.assert_close(native[..., half:], reference[..., half:], rtol=0, atol=EXACT)
    assert (native[..., :half] - reference[..., :half]).abs().max() > 1e-2
    assert_exact(native, pack)


def _encode_latent(server, prompt) -> torch.Tensor:
    """The reference latent the encode node returns, saved as a latent."""
    only = {k: prompt[k] for k in ("2", "3", "4", "12")}
    only["40"] = node("SaveLatent", samples=["12", 2], filename_prefix="latents/reference")
    return latent(server, run(server, only), "40")


# ------------------------------------------------------------------------------ ComfyUI's other nodes


def test_other_samplers_and_schedulers_run(server):
    prompt = base_prompt()
    ksampler(prompt, sampler="dpmpp_2m", scheduler="beta", prefix="dpmpp")
    custom_sampler(prompt, sampler="euler_ancestral")
    entry = run(server, prompt)
    for node_id in ("22", "18"):
        out = latent(server, entry, node_id)
        assert out.shape == (1, 16, 6, 8) and torch.isfinite(out).all()


def test_comfyuis_vae_decode_with_the_flux_vae_decodes_the_result(server):
    """The tiny FLUX VAE (ComfyUI's own Load VAE only builds the full-size one) in ComfyUI's VAE Decode."""
    from PIL import Image

    prompt = base_prompt()
    custom_sampler(prompt)
    prompt["41"] = node("VAEDecode", samples=["17", 0], vae=["3", 0])
    prompt["42"] = node("SaveImage", images=["41", 0], filename_prefix="native")
    image = run(server, prompt)["outputs"]["42"]["images"][0]
    with Image.open(server.base / "output" / image["subfolder"] / image["filename"]) as saved:
        assert saved.size == (64, 48)


def test_timestep_range_and_combine_keep_the_result_zero_out_and_set_mask_run(server, edit):
    prompt = base_prompt()
    prompt["30"] = node("ConditioningSetTimestepRange", conditioning=["12", 0], start=0.0, end=1.0)
    custom_sampler(prompt, positive=("30", 0), prefix="range")
    full_range = latent(server, run(server, prompt), "18")
    torch.testing.assert_close(full_range, edit["native"], rtol=0, atol=1e-6)

    prompt["30"] = node("ConditioningCombine", conditioning_1=["12", 0], conditioning_2=["12", 0])
    combined = latent(server, run(server, prompt), "18")
    torch.testing.assert_close(combined, edit["native"], rtol=0, atol=COMBINED)

    prompt["30"] = node("ConditioningZeroOut", conditioning=["12", 1])
    custom_sampler(prompt, negative=("30", 0), prefix="zero")
    assert torch.isfinite(latent(server, run(server, prompt), "18")).all()

    prompt["30"] = node("ConditioningSetMask", conditioning=["12", 0], mask=["4", 1], strength=1.0,
                        set_cond_area="default")
    custom_sampler(prompt, positive=("30", 0), prefix="regional")
    assert torch.isfinite(latent(server, run(server, prompt), "18")).all()


def test_differential_diffusion_runs_a_soft_mask_edit(server):
    prompt = base_prompt()
    prompt["30"] = node("SetLatentNoiseMask", samples=["12", 2], mask=["4", 1])
    prompt["31"] = node("DifferentialDiffusion", model=["11", 0])
    custom_sampler(prompt, latent=("30", 0), model="31")
    assert torch.isfinite(latent(server, run(server, prompt), "18")).all()


def test_an_area_crop_and_a_missing_reference_are_node_errors(server):
    prompt = base_prompt()
    prompt["12"]["inputs"]["size_level"] = 256  # ComfyUI crops to the mask's bounds only above 8x8 latent pixels
    prompt["30"] = node("ConditioningSetMask", conditioning=["12", 0], mask=["4", 1], strength=1.0,
                        set_cond_area="mask bounds")
    custom_sampler(prompt, positive=("30", 0))
    entry = server.run(prompt, timeout=300)
    error = messages(entry, "execution_error")[0]
    assert "area conditioning" in error["exception_message"] and "set_cond_area 'default'" in error["exception_message"]

    prompt = base_prompt()
    del prompt["12"]["inputs"]["vae"]
    custom_sampler(prompt)
    error = messages(server.run(prompt, timeout=300), "execution_error")[0]
    assert "carries no reference latent" in error["exception_message"]


def test_cancel_stops_ksampler_between_steps(server):
    prompt = base_prompt()
    ksampler(prompt, steps=2)
    run(server, prompt)  # loaders and encode cached: the long run below is all sampling
    prompt["21"]["inputs"]["steps"] = 200
    entry = server.cancel(prompt, after_s=2.0)
    interrupted = messages(entry, "execution_interrupted")
    assert interrupted and interrupted[0]["node_type"] == "KSampler", entry["status"]


# ------------------------------------------------------------------------------- in one ComfyUI process

SCRIPT = r"""
sys.argv += ["--preview-method", "latent2rgb"]  # read when comfy.cli_args is first imported, just below
import comfy.sample, comfy.samplers, comfy.utils, folder_paths, latent_preview
import torch
from safetensors.torch import save_file
from node_support import load_pack, run_node

pack = load_pack()
folder_paths.add_model_folder_path("diffusion_models", config["diffusion_models"])
lib = lambda name: importlib.import_module("step1x_edit_pack.step1x." + name)
denoise_mod, stepwise = lib("sampling.denoise"), lib("stepwise")
model = run_node(pack, "Step1XEditModelLoader", unet_name=config["dit"], weight_dtype="default", attention="sdpa")[0]
dit = model.model.diffusion_model
g = torch.Generator().manual_seed(0)
width = dit.params.connector.in_channels
h, w, steps = 6, 8, 3
raw_ref = torch.randn(1, 16, h, w, generator=g)

def side(length, valid):
    emb = torch.randn(1, length, width, generator=g) * 12  # |cond - uncond| above 1: the renorm acts
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[:, :valid] = 1
    return denoise_mod.TextConditioning(emb, mask)

cond, uncond = side(10, 8), side(7, 5)
def conditioning(text):
    return [[text.llm_embedding, {"step1x_mask": text.mask, "step1x_edit": True, "reference_latents": [raw_ref]}]]

seen, connector_inputs = [], []
real_velocity = stepwise.velocity
def recording_velocity(model, x, t, text, *args, **kwargs):
    seen.append({k: getattr(text, k) for k in ("llm_embedding", "mask")})
    return real_velocity(model, x, t, text, *args, **kwargs)
stepwise.velocity = recording_velocity
real_prepare = dit.connector.prepare
def recording_prepare(x, mask):
    connector_inputs.append(x.shape)
    return real_prepare(x, mask)
dit.connector.prepare = recording_prepare

sigmas = stepwise.official_sigmas(steps, h, w)
latent = torch.zeros(1, 16, h, w)
noise = comfy.sample.prepare_noise(latent, 5)
comfy.utils.PROGRESS_BAR_ENABLED = False

def sample(patcher):
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(conditioning(cond), conditioning(uncond))
    guider.set_cfg(6.0)
    return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=5).cpu()

result = sample(model)
del dit.connector.prepare
stepwise.velocity = real_velocity
renorm_off = sample(run_node(pack, "Step1XEditCFGRenorm", model=model, renorm_threshold=1.0)[0])

# the official algorithm with one pass per side (each text at its own length), written with the DiT's own parts
pack_, unpack, position_ids = denoise_mod.pack, denoise_mod.unpack, denoise_mod.position_ids
ref = (raw_ref - 0.1159) * 0.3611
base = denoise_mod.reference_id_base(dit.version)
ids = torch.cat([position_ids(1, h // 2, w // 2), position_ids(1, h // 2, w // 2, base)], 1)
norms = []

def official(threshold):
    x = pack_(noise.float())
    with torch.no_grad():
        for i in range(steps):
            t, t_prev = float(sigmas[i]), float(sigmas[i + 1])
            preds = []
            for text in (cond, uncond):
                txt_ids = torch.zeros(1, text.llm_embedding.shape[1], 3)
                t_vec = torch.full((1,), t)
                txt, y = dit.connector(text.llm_embedding, t_vec, text.mask)
                img = torch.cat([x, pack_(ref)], 1)
                pe = dit.rope(torch.cat([txt_ids, ids], 1))
                preds.append(dit.transformer(img, ids, txt_ids, t_vec, txt, y, pe)[:, : x.shape[1]])
            norms.append(float((preds[0] - preds[1]).norm(dim=2).max()))
            x = x + (t_prev - t) * denoise_mod.guidance(preds[0], preds[1], 6.0, t > threshold)
    return unpack(x, h, w)  # model space, where the official loop works

previews = []
comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: previews.append(preview))
positive = [[cond.llm_embedding, {"step1x_mask": cond.mask}]]
negative = [[uncond.llm_embedding, {"step1x_mask": uncond.mask}]]
comfy.sample.sample(model, noise, steps, 6.0, "euler", "simple", positive, negative, latent, seed=5,
                    callback=latent_preview.prepare_callback(model, steps))

model_space = lambda raw: (raw - 0.1159) * 0.3611
out = {"result": model_space(result), "official": official(0.93), "renorm_off": model_space(renorm_off),
       "official_off": official(1.0),
       "first_step_max_norm": torch.tensor(norms[0])}
for i, record in enumerate(seen):
    for key, value in record.items():
        out[f"seen{i}.{key}"] = value.float()
for name, text in (("cond", cond), ("uncond", uncond)):
    for key in ("llm_embedding", "mask"):
        out[f"{name}.{key}"] = getattr(text, key).float()
save_file(out, config["out"], metadata={"connector": json.dumps([list(s) for s in connector_inputs]),
          "previews": json.dumps([None if p is None else [p[0], list(p[1].size)] for p in previews])})
"""


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    from node_support import tokenizer_for_tests, write_tiny_models

    root = tmp_path_factory.mktemp("comfy_native_inprocess")
    names = write_tiny_models(root / "models", tokenizer_for_tests(root / "tokenizer"))
    config = {"dit": names["dit"], "out": str(root / "out.sft"),
              "diffusion_models": str(root / "models" / "diffusion_models")}
    run_script(SCRIPT, config, timeout=600)
    tensors, meta = saved_tensors(config["out"])
    return tensors, json.loads(meta["connector"]), json.loads(meta["previews"])


def test_texts_of_unequal_length_reach_the_model_as_given(in_process):
    tensors, connector_calls, _ = in_process
    assert sorted({tuple(shape) for shape in connector_calls}) == [(1, 7, 64), (1, 10, 64)], connector_calls
    calls = sorted({k.split(".")[0] for k in tensors if k.startswith("seen")})
    assert len(calls) == 2 * 3, "one evaluation per side and step, never one padded batch"
    for call in calls:
        side = "cond" if tensors[f"{call}.llm_embedding"].shape[1] == 10 else "uncond"
        for key in ("llm_embedding", "mask"):
            assert torch.equal(tensors[f"{call}.{key}"], tensors[f"{side}.{key}"]), (call, key)


def test_unequal_lengths_sample_as_the_official_loop_with_one_pass_per_side(in_process):
    """Compared in model space (``0.3611 * (raw - 0.1159)``), where the official loop works."""
    tensors, _, _ = in_process
    assert tensors["first_step_max_norm"] > 1, "the guidance difference is renormalised at t = 1"
    assert tensors["official"].abs().max() < 6
    torch.testing.assert_close(tensors["result"], tensors["official"], rtol=0, atol=EXACT)


def test_the_renorm_node_sets_the_threshold_of_the_official_guidance(in_process):
    tensors, _, _ = in_process
    torch.testing.assert_close(tensors["renorm_off"], tensors["official_off"], rtol=0, atol=EXACT)
    assert (tensors["renorm_off"] - tensors["result"]).abs().max() > 1e-2


def test_comfyuis_latent_previewer_gets_a_preview_every_step(in_process):
    _, _, previews = in_process
    assert len(previews) == 3 and all(p is not None and p[0] == "JPEG" for p in previews), previews


# ------------------------------------------------------------------------------------------- workflows


def ui_to_api(workflow: dict, info: dict) -> dict:
    """A UI-format workflow as the API prompt the frontend would queue, from ComfyUI's /object_info."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for item in workflow["nodes"]:
        if item["type"] in ("Note", "MarkdownNote"):
            continue
        spec = info[item["type"]]
        inputs = {entry["name"]: [str(links[entry["link"]][1]), links[entry["link"]][2]]
                  for entry in item["inputs"] if entry["link"] is not None}
        values = list(item["widgets_values"])
        for name in spec["input_order"]["required"] + spec["input_order"].get("optional", []):
            entry = spec["input"].get("required", {}).get(name) or spec["input"]["optional"][name]
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            if name in inputs or not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")):
                continue
            inputs[name] = values.pop(0)
            if options.get("control_after_generate") or options.get("image_upload") or name in ("seed", "noise_seed"):
                values.pop(0)
        prompt[str(item["id"])] = node(item["type"], **inputs)
    return prompt


@pytest.mark.parametrize("name, output", [("step1x_native_ksampler", "10"), ("step1x_native_custom_sampler", "13"),
                                          ("step1x_v12_native_ksampler", "10")])
def test_the_native_workflows_run_as_saved(server, name, output):
    """Only the sizes change (steps, size_level) and Load VAE takes the tiny FLUX VAE through the pack's loader,
    since ComfyUI's own loader builds the full-size one. The v1.2 workflow runs on the tiny v1.2 model folder under
    its real name, as saved."""
    from PIL import Image

    prompt = ui_to_api(json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8")), server.get("/object_info"))
    for item in prompt.values():
        if item["class_type"] == "VAELoader":
            item.update(node("Step1XEditVAELoader", vae_name=MODEL_NAMES["vae"]))
        for key, value in (("steps", STEPS), ("size_level", SIZE_LEVEL)):
            if key in item["inputs"]:
                item["inputs"][key] = value
    image = run(server, prompt)["outputs"][output]["images"][0]
    with Image.open(server.base / "output" / image["subfolder"] / image["filename"]) as saved:
        assert saved.size == IMAGE_SIZE
