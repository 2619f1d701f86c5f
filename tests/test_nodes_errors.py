"""Bad input reaches the user as an exception from the node that says what to change."""

import math

import pytest
import torch

from node_support import bind, fake_embeds, image, lib, run_node, sample

REFERENCE = {"samples": torch.zeros(1, 16, 6, 8)}


def test_missing_model_file_names_the_folder(pack, model_names):
    with pytest.raises(FileNotFoundError, match=r"'gone\.safetensors' not found in the diffusion_models folders.*Put "
                                                r"the file there"):
        run_node(pack, "Step1XEditDiTLoader", unet_name="gone.safetensors", weight_dtype="default", attention="auto")


def test_flux_checkpoint_in_the_dit_loader_is_named_as_such(pack, model_names):
    with pytest.raises(ValueError, match=r"flux1-dev-tiny\.safetensors is a FLUX\.1-dev style DiT.*not a Step1X-Edit"):
        run_node(pack, "Step1XEditDiTLoader", unet_name=model_names["flux"], weight_dtype="default", attention="auto")


def test_an_error_carries_the_packs_own_type_name_not_the_folder_it_was_imported_from(pack, model_names):
    """ComfyUI reports ``type.__module__ + "." + qualname``; the pack is imported under its folder's name."""
    with pytest.raises(ValueError) as raised:
        run_node(pack, "Step1XEditDiTLoader", unet_name=model_names["flux"], weight_dtype="default", attention="auto")
    kind = type(raised.value)
    assert kind is lib("checkpoints.safetensors_file").CheckpointError, "the pack's own copy of the class"
    assert f"{kind.__module__}.{kind.__qualname__}" == "step1x.checkpoints.safetensors_file.CheckpointError"


def test_sdxl_vae_in_the_vae_loader_is_refused(pack, model_names):
    with pytest.raises(ValueError, match=r"4-channel VAE.*16-channel FLUX VAE"):
        run_node(pack, "Step1XEditVAELoader", vae_name=model_names["sdxl_vae"])


def test_unavailable_attention_backend_gives_an_install_hint(pack, model_names):
    from importlib.util import find_spec

    if find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(RuntimeError, match=r"'flash' needs the package 'flash_attn'.*pip install flash-attn"):
        run_node(pack, "Step1XEditDiTLoader", unet_name=model_names["dit"], weight_dtype="default", attention="flash")


def test_connector_width_must_match_the_encoder(pack, model_names):
    narrow = run_node(pack, "Step1XEditDiTLoader", unet_name=model_names["dit_w48"], weight_dtype="default",
                      attention="auto")[0]
    with pytest.raises(ValueError, match=r"embeddings are 64 wide .* expects 48: use the encoder this DiT was trained"):
        bind(pack, narrow, fake_embeds(pack, hidden=64))


def test_sampler_needs_the_dit_the_connector_was_bound_to(pack, dit, model_names):
    other = run_node(pack, "Step1XEditDiTLoader", unet_name=model_names["dit"], weight_dtype="default",
                     attention="sdpa")[0]
    with pytest.raises(ValueError, match=r"connect the same Step1X-Edit DiT loader to the connector and the sampler"):
        sample(pack, other, bind(pack, dit, fake_embeds(pack)), reference_latent=REFERENCE)


def test_mask_batch_must_fit_the_image_batch(pack, dit, vae):
    conditioning = bind(pack, dit, fake_embeds(pack, batch=2))
    with pytest.raises(ValueError, match=r"the mask has a batch of 3 but the reference image has 2; give 1 or 2"):
        sample(pack, dit, conditioning, reference_image=image(64, 48, batch=2), vae=vae, mask=torch.ones(3, 48, 64))


def test_mask_size_must_be_the_image_size(pack, dit, vae):
    with pytest.raises(ValueError, match=r"the mask is 32x32 but the reference image is 64x48; use a mask painted on"):
        sample(pack, dit, bind(pack, dit, fake_embeds(pack)), reference_image=image(64, 48), vae=vae,
               mask=torch.ones(1, 32, 32))


@pytest.mark.parametrize("node_id", ["Step1XEditResize", "Step1XEditVAEEncode"])
def test_empty_image_is_refused(pack, vae, node_id):
    inputs = {"Step1XEditResize": {"size_level": 512, "resample": "lanczos"}, "Step1XEditVAEEncode": {"vae": vae}}
    with pytest.raises(ValueError, match=r"image is empty \(shape \(0, 48, 64, 3\)\); connect a loaded image"):
        run_node(pack, node_id, image=torch.zeros(0, 48, 64, 3), **inputs[node_id])


def test_empty_reference_image_is_refused_by_the_sampler(pack, dit, vae):
    with pytest.raises(ValueError, match=r"reference_image is empty"):
        sample(pack, dit, bind(pack, dit, fake_embeds(pack)), reference_image=torch.zeros(1, 0, 0, 3), vae=vae)


def test_zero_steps_are_refused(pack, dit):
    with pytest.raises(ValueError, match=r"steps must be at least 1, got 0; 28 is the official setting"):
        sample(pack, dit, bind(pack, dit, fake_embeds(pack)), steps=0, reference_latent=REFERENCE)


@pytest.mark.parametrize("cfg", [math.nan, math.inf])
def test_non_finite_cfg_is_refused(pack, dit, cfg):
    with pytest.raises(ValueError, match=r"cfg is (nan|inf); set a finite number \(6\.0 is the official setting\)"):
        sample(pack, dit, bind(pack, dit, fake_embeds(pack)), cfg=cfg, reference_latent=REFERENCE)


def test_an_sd_vae_from_comfyui_is_refused(pack, dit):
    class SDVAE:
        latent_channels, downscale_ratio = 4, 8

        def encode(self, pixels):
            raise AssertionError("never called")

        decode = encode

    with pytest.raises(ValueError, match=r"4-channel latents.*needs the 16-channel FLUX VAE: load ae\.safetensors"):
        sample(pack, dit, bind(pack, dit, fake_embeds(pack)), reference_image=image(64, 48), vae=SDVAE())


def test_reference_image_needs_a_vae(pack, dit):
    with pytest.raises(ValueError, match=r"a VAE is needed here"):
        sample(pack, dit, bind(pack, dit, fake_embeds(pack)), reference_image=image(64, 48))


def test_text_to_image_needs_a_size(pack, dit):
    with pytest.raises(ValueError, match=r"text-to-image needs a size: connect an Empty SD3 Latent Image"):
        sample(pack, dit, bind(pack, dit, fake_embeds(pack, working=None)))


def test_edit_embeddings_need_their_reference(pack, dit):
    with pytest.raises(ValueError, match=r"encoded with an image: connect that image as reference_image"):
        sample(pack, dit, bind(pack, dit, fake_embeds(pack)), init_latent=REFERENCE)


def test_latent_of_an_sd_vae_is_refused(pack, dit):
    with pytest.raises(ValueError, match=r"reference_latent has 4 channels; Step1X-Edit needs the 16-channel FLUX"):
        sample(pack, dit, bind(pack, dit, fake_embeds(pack)), reference_latent={"samples": torch.zeros(1, 4, 6, 8)})


def test_vae_encode_needs_the_working_size(pack, vae):
    with pytest.raises(ValueError, match=r"both sides must be multiples of 16.*Resize with the size_level resize"):
        run_node(pack, "Step1XEditVAEEncode", vae=vae, image=image(70, 50))


def test_other_gpu_without_a_second_gpu_says_what_to_choose(bridge, monkeypatch):
    if torch.cuda.device_count() > 1:
        pytest.skip("a second GPU is present")
    monkeypatch.setattr(bridge, "main_device", lambda: torch.device("cuda", 0))  # the only GPU, if any, is the main one
    with pytest.raises(ValueError, match=r"'other_gpu' needs a second CUDA GPU.*choose main_gpu, default or cpu"):
        bridge.text_encoder_devices("other_gpu")
