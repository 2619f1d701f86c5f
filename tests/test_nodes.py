"""The node classes through the headless bridge, on tiny model files: the whole graph on CPU, the latent
convention, masks, batches, progress and Cancel, and what every node declares."""

import importlib
import subprocess
import sys

import pytest
import torch

from node_support import (
    PACK_NAME,
    ROOT,
    STEPS,
    bind,
    fake_embeds,
    image,
    lib,
    load_pack,
    random_latent,
    run_node,
    sample,
)

# ------------------------------------------------------------------------------------------ declarations


def test_one_table_feeds_both_mappings(pack):
    nodes = importlib.import_module(f"{PACK_NAME}.nodes")
    assert set(pack.NODE_CLASS_MAPPINGS) == set(nodes.NODE_CONFIG) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert set(pack.NODE_CLASS_MAPPINGS) == {
        "Step1XEditDiTLoader", "Step1XEditLoraLoader", "Step1XEditTeaCache", "Step1XEditMLLMLoader",
        "Step1XEditVAELoader", "Step1XEditInstructionEncode", "Step1XEditConnector", "Step1XEditSampler",
        "Step1XEditVAEDecode", "Step1XEditVAEEncode", "Step1XEditResize", "Step1XEditRestoreSize",
        "Step1XEditThink", "Step1XEditReflect", "Step1XEditReasonEdit",
        "Step1XEditRegionE",
        "Step1XEditModelLoader", "Step1XEditEncode", "Step1XEditSigmas", "Step1XEditModelSampling",
        "Step1XEditCFGRenorm",
    }


@pytest.mark.parametrize("node_id", sorted(load_pack().NODE_CLASS_MAPPINGS))
def test_every_node_documents_itself(pack, model_names, node_id):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    assert cls.CATEGORY == "Step1X-Edit"
    assert len(cls.DESCRIPTION) > 40
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    for section in cls.INPUT_TYPES().values():
        for name, spec in section.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert callable(getattr(cls, cls.FUNCTION))


def test_dropdowns_list_the_users_files(pack, model_names):
    types = lambda node_id: pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"]  # noqa: E731
    assert model_names["dit"] in types("Step1XEditDiTLoader")["unet_name"][0]
    assert model_names["vae"] in types("Step1XEditVAELoader")["vae_name"][0]
    choices = types("Step1XEditMLLMLoader")["mllm_name"][0]
    assert model_names["mllm"] in choices
    assert not any(c.startswith(model_names["mllm"] + "/") for c in choices), "shards of a folder are not models"


def test_dropdowns_follow_linked_folders_and_list_a_linked_mllm_folder_once(pack, bridge, tmp_path, monkeypatch):
    store = tmp_path / "store"
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (store / "Qwen2.5-VL-7B-Instruct").mkdir(parents=True, exist_ok=True)
        (store / "Qwen2.5-VL-7B-Instruct" / name).write_bytes(b"")
    (store / "dits").mkdir()
    (store / "dits" / "step1x-edit-v1p1-official.safetensors").write_bytes(b"")
    folders = {kind: tmp_path / kind for kind in ("text_encoders", "diffusion_models")}
    for folder in folders.values():
        (folder / ".git").mkdir(parents=True)
        (folder / ".git" / "config.json").write_bytes(b"")
    (folders["text_encoders"] / "Qwen2.5-VL-7B-Instruct").symlink_to(store / "Qwen2.5-VL-7B-Instruct",
                                                                     target_is_directory=True)
    (folders["diffusion_models"] / "linked").symlink_to(store / "dits", target_is_directory=True)
    monkeypatch.setattr(bridge, "_HEADLESS_FOLDERS", {kind: [folder] for kind, folder in folders.items()})
    monkeypatch.delenv("STEP1X_MODELS_DIR", raising=False)
    types = lambda node_id: pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"]  # noqa: E731
    assert types("Step1XEditMLLMLoader")["mllm_name"][0] == ["Qwen2.5-VL-7B-Instruct"]
    assert types("Step1XEditDiTLoader")["unet_name"][0] == ["linked/step1x-edit-v1p1-official.safetensors"]


# ---------------------------------------------------------------------------------------------- graphs


def test_whole_edit_graph_on_cpu_gives_an_image_at_the_original_size(pack, dit, vae, mllm):
    original = image(100, 60)
    embeds = run_node(pack, "Step1XEditInstructionEncode", mllm=mllm, instruction="make the sky purple",
                      negative_prompt="", size_level=64, image=original)[0]
    assert embeds.working_size == (80, 48)
    assert embeds.cond.llm_embedding.shape == (1, 640, 64) and embeds.uncond.mask.shape == (1, 640)
    latent = sample(pack, dit, bind(pack, dit, embeds), reference_image=original, vae=vae)
    assert latent["samples"].shape == (1, 16, 6, 10)
    edited = run_node(pack, "Step1XEditVAEDecode", vae=vae, samples=latent)[0]
    assert edited.shape == (1, 48, 80, 3)
    restored = run_node(pack, "Step1XEditRestoreSize", image=edited, original=original, resample="bicubic")[0]
    assert restored.shape == original.shape
    assert 0.0 <= float(restored.min()) and float(restored.max()) <= 1.0


def test_text_to_image_uses_the_same_nodes(pack, dit, vae, mllm):
    embeds = run_node(pack, "Step1XEditInstructionEncode", mllm=mllm, instruction="a red fox in snow",
                      negative_prompt=lib("models.configs").T2I_NEGATIVE_PROMPT, size_level=512)[0]
    assert embeds.text_to_image
    empty = {"samples": torch.zeros(1, 16, 6, 8)}
    latent = sample(pack, dit, bind(pack, dit, embeds), init_latent=empty)
    assert run_node(pack, "Step1XEditVAEDecode", vae=vae, samples=latent)[0].shape == (1, 48, 64, 3)


def test_sampler_is_the_library_sampler_and_returns_raw_latents(pack, dit):
    embeds = fake_embeds(pack)
    reference = random_latent()
    latent = sample(pack, dit, bind(pack, dit, embeds), seed=7, reference_latent={"samples": reference})["samples"]
    sampling = lib("sampling.denoise")
    with torch.no_grad():
        expected = sampling.denoise(
            dit.model, sampling.make_noise((1, 16, 6, 8), 7), embeds.cond, embeds.uncond,
            reference=lib("graph_io").latent_to_model_space(reference), steps=STEPS, cfg_scale=6.0,
            renorm_threshold=0.93, compute_dtype=torch.float32,
        )
    scale, shift = lib("models.configs").FLUX_VAE.scale_factor, lib("models.configs").FLUX_VAE.shift_factor
    torch.testing.assert_close(latent, expected / scale + shift, atol=1e-5, rtol=0)


def test_reference_image_is_resized_to_the_working_size_of_the_instruction(pack, dit, vae):
    latent = sample(pack, dit, bind(pack, dit, fake_embeds(pack, working=(64, 48))),
                    reference_image=image(100, 75), vae=vae)
    assert latent["samples"].shape == (1, 16, 6, 8)


def test_a_comfyui_vae_object_works_in_place_of_ours(pack, dit, vae):
    class ComfyLikeVAE:  # what comfy.sd.VAE offers the nodes: encode, decode, latent_channels
        latent_channels, downscale_ratio = 16, 8
        encode, decode = vae.encode, vae.decode

    conditioning = bind(pack, dit, fake_embeds(pack))
    ours = sample(pack, dit, conditioning, reference_image=image(64, 48), vae=vae)
    theirs = sample(pack, dit, conditioning, reference_image=image(64, 48), vae=ComfyLikeVAE())
    torch.testing.assert_close(ours["samples"], theirs["samples"], atol=0, rtol=0)
    decoded = run_node(pack, "Step1XEditVAEDecode", vae=ComfyLikeVAE(), samples=ours)[0]
    assert decoded.shape == (1, 48, 64, 3)


def test_our_vae_speaks_the_comfyui_vae_interface(vae):
    pixels = image(70, 50)
    raw = vae.encode(pixels)
    assert raw.shape == (1, 16, 6, 8), "centre-cropped to multiples of 8, as ComfyUI's VAE"
    with torch.no_grad():
        mean = vae.autoencoder.encode_raw(pixels[:, 1:49, 3:67].movedim(-1, 1) * 2 - 1)
    torch.testing.assert_close(raw, mean, atol=0, rtol=0)
    out = vae.decode(raw)
    assert out.shape == (1, 48, 64, 3) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_outside_the_mask_the_result_keeps_the_reference(pack, dit):
    reference = random_latent()
    mask = torch.zeros(1, 48, 64)
    mask[:, :, :32] = 1.0
    latent = sample(pack, dit, bind(pack, dit, fake_embeds(pack)), reference_latent={"samples": reference},
                    mask=mask)["samples"]
    torch.testing.assert_close(latent[..., 4:], reference[..., 4:], atol=1e-5, rtol=0)
    assert (latent[..., :4] - reference[..., :4]).abs().max() > 0.1


def test_batch_size_gives_several_results_per_reference(pack, dit):
    references = random_latent(batch=2)
    latent = sample(pack, dit, bind(pack, dit, fake_embeds(pack)), batch_size=2,
                    reference_latent={"samples": references})["samples"]
    assert latent.shape == (4, 16, 6, 8)
    assert (latent[0] - latent[1]).abs().max() > 0.1, "each result draws its own noise"


def test_img2img_starts_from_the_init_latent(pack, dit):
    reference, init = random_latent(seed=0), random_latent(seed=1)
    conditioning = bind(pack, dit, fake_embeds(pack))
    runs = [sample(pack, dit, conditioning, denoise=0.4, steps=5, reference_latent={"samples": reference},
                   init_latent={"samples": start})["samples"] for start in (init, init, reference)]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    assert (runs[0] - runs[2]).abs().max() > 0.1


def test_progress_reports_each_step_and_cancel_stops_between_steps(pack, dit, bridge):
    seen = []

    def hook(step, total, preview):
        seen.append((step, total))
        if step == 2:
            bridge.request_interrupt()

    bridge.set_progress_hook(hook)
    try:
        with pytest.raises(bridge.Interrupted):
            sample(pack, dit, bind(pack, dit, fake_embeds(pack)), steps=6,
                   reference_latent={"samples": random_latent()})
    finally:
        bridge.set_progress_hook(None)
        bridge.request_interrupt(False)
    assert seen == [(1, 6), (2, 6)]


def test_resize_follows_the_official_size_level_geometry(pack):
    resized, mask, width, height = run_node(pack, "Step1XEditResize", image=image(1024, 768), size_level=512,
                                            resample="lanczos", mask=torch.ones(1, 768, 1024))
    assert (width, height) == lib("geometry").size_level_dims(1024, 768, 512) == (592, 432)
    assert resized.shape == (1, 432, 592, 3) and mask.shape == (1, 432, 592)


def test_vae_encode_node_gives_a_latent_the_sampler_takes(pack, dit, vae):
    latent = run_node(pack, "Step1XEditVAEEncode", vae=vae, image=image(64, 48))[0]
    assert latent["samples"].shape == (1, 16, 6, 8)
    out = sample(pack, dit, bind(pack, dit, fake_embeds(pack)), reference_latent=latent)
    assert out["samples"].shape == (1, 16, 6, 8)


def test_every_weight_can_stay_offloaded_under_lowvram(dit, vae):
    """ComfyUI's partial loading leaves layers it cannot fit on the CPU and relies on them casting their weights
    to the input's device: every module holding weights must be such a layer or cast in its own forward."""
    ops = lib("models.ops")
    casting = (ops.CastLinear, ops.CastConv2d, ops.CastGroupNorm, ops.CastLayerNorm, lib("models.layers").RMSNorm)
    for model in (dit.model, vae.autoencoder):
        for name, module in model.named_modules():
            if next(module.parameters(recurse=False), None) is None:
                continue
            assert isinstance(module, casting) or name == "connector", f"{name} ({type(module).__name__})"


def test_the_pack_imports_without_comfyui_or_optional_packages(pack):
    blocked = ["comfy", "folder_paths", "latent_preview", "transformers", "xformers", "flash_attn"]
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r}));"
            "from node_support import load_pack; print(len(load_pack().NODE_CLASS_MAPPINGS))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=ROOT / "tests", env={"PATH": "", "PYTHONPATH": str(ROOT / "tests")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(len(pack.NODE_CLASS_MAPPINGS)), "every node, with no package missing"


@pytest.mark.parametrize("choice,dtype,keep_fp8", [("bf16", torch.bfloat16, False),
                                                   ("bf16 + fp8 weights", torch.bfloat16, True),
                                                   ("fp32", torch.float32, False)])
def test_mllm_dtype_choice_reaches_the_encoder_loader(pack, model_names, monkeypatch, choice, dtype, keep_fp8):
    encoder_pkg = lib("encoder")
    seen = {}
    real = encoder_pkg.load_text_encoder

    def recording(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(encoder_pkg, "load_text_encoder", recording)
    mllm = run_node(pack, "Step1XEditMLLMLoader", mllm_name=model_names["mllm"], dtype=choice, device="cpu")[0]
    assert (seen["dtype"], seen["keep_fp8"]) == (dtype, keep_fp8)
    assert mllm.encoder.dtype == dtype
