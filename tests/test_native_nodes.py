"""The native-path nodes that are plain tensors (Encode, Sigmas) through the headless bridge, and the MODEL nodes'
answer outside ComfyUI. Inside a real ComfyUI they are tested by test_native_comfyui.py."""

import pytest
import torch

from node_support import image, lib, run_node

SIZE_LEVEL = 64


@pytest.fixture(scope="module")
def picture():
    return image(96, 72, seed=3)


@pytest.fixture(scope="module")
def encoded(pack, mllm, vae, picture):
    return run_node(pack, "Step1XEditEncode", mllm=mllm, instruction="make it red", negative_prompt="",
                    size_level=SIZE_LEVEL, image=picture, vae=vae)


def test_encode_carries_the_instruction_embeddings_as_conditioning(pack, mllm, picture, encoded):
    embeds = run_node(pack, "Step1XEditInstructionEncode", mllm=mllm, instruction="make it red", negative_prompt="",
                      size_level=SIZE_LEVEL, image=picture)[0]
    positive, negative, _ = encoded
    for conditioning, side in ((positive, embeds.cond), (negative, embeds.uncond)):
        assert len(conditioning) == 1
        tensor, entries = conditioning[0]
        assert torch.equal(tensor, side.llm_embedding)
        assert torch.equal(entries["step1x_mask"], side.mask)
        assert entries["step1x_edit"] is True
        assert not {"step1x_txt_ids", "step1x_text_embeds", "step1x_text_mask"} & set(entries), "v1.0/v1.1"


def test_encode_attaches_the_reference_latent_at_the_working_size_as_reference_latent_does(pack, vae, picture,
                                                                                        encoded):
    positive, negative, latent = encoded
    working = lib("geometry").resize_to_size_level(lib("image_io").comfy_to_pil(picture)[0], SIZE_LEVEL).size
    expected = vae.encode(lib("graph_io").resize_images(picture, working))
    for conditioning in (positive, negative):
        (reference,) = conditioning[0][1]["reference_latents"]
        assert torch.equal(reference, expected)
    assert torch.equal(latent["samples"], expected)
    assert tuple(latent["samples"].shape[-2:]) == (working[1] // 8, working[0] // 8)


def test_without_a_vae_the_reference_is_left_to_reference_latent(pack, mllm, picture):
    positive, _, latent = run_node(pack, "Step1XEditEncode", mllm=mllm, instruction="x", negative_prompt="",
                                   size_level=SIZE_LEVEL, image=picture)
    assert "reference_latents" not in positive[0][1] and positive[0][1]["step1x_edit"] is True
    assert latent["samples"].abs().sum() == 0 and latent["samples"].shape == (1, 16, 6, 8)


def test_text_to_image_gives_an_empty_size_level_latent(pack, mllm):
    positive, negative, latent = run_node(pack, "Step1XEditEncode", mllm=mllm, instruction="a red cube",
                                          negative_prompt="blurry", size_level=SIZE_LEVEL)
    assert positive[0][1]["step1x_edit"] is False and "reference_latents" not in negative[0][1]
    assert latent["samples"].shape == (1, 16, SIZE_LEVEL // 8, SIZE_LEVEL // 8)


def test_the_sigmas_node_gives_the_official_schedule_of_the_latent(pack):
    latent = {"samples": torch.zeros(2, 16, 64, 96)}
    sigmas = run_node(pack, "Step1XEditSigmas", latent=latent, steps=28, denoise=1.0)[0]
    assert sigmas.tolist() == lib("sampling.denoise").get_schedule(28, 32 * 48)
    img2img = run_node(pack, "Step1XEditSigmas", latent=latent, steps=28, denoise=0.5)[0]
    assert img2img.tolist() == sigmas.tolist()[14:]


def test_the_sigmas_node_names_a_latent_of_another_model(pack):
    with pytest.raises(ValueError, match="4 channels; Step1X-Edit needs the 16-channel FLUX latent"):
        run_node(pack, "Step1XEditSigmas", latent={"samples": torch.zeros(1, 4, 8, 8)}, steps=4, denoise=1.0)


@pytest.mark.parametrize("node_id, inputs", [
    ("Step1XEditModelLoader", {"unet_name": "x.safetensors", "weight_dtype": "default", "attention": "auto"}),
    ("Step1XEditModelSampling", {"model": None, "latent": {"samples": torch.zeros(1, 16, 8, 8)}}),
    ("Step1XEditCFGRenorm", {"model": None, "renorm_threshold": 0.93}),
])
def test_the_model_nodes_say_they_need_comfyui(pack, node_id, inputs):
    with pytest.raises(RuntimeError, match="run inside ComfyUI only"):
        run_node(pack, node_id, **inputs)


def test_the_renorm_threshold_is_checked(pack):
    with pytest.raises(ValueError, match="renorm_threshold must be within"):
        run_node(pack, "Step1XEditCFGRenorm", model=None, renorm_threshold=1.5)
