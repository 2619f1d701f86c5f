"""What the nodes do with inputs that would otherwise pass silently: NaN/Inf in an IMAGE, LATENT or MASK is refused
with the input named, values outside [0, 1] are clamped, an empty instruction or a size_level that blows the image up
many times is logged, and denoise 0 returns the start point as the library does."""

from __future__ import annotations

import logging

import pytest
import torch

from node_support import bind, fake_embeds, image, lib, random_latent, run_node, sample

NAN = float("nan")


def poisoned(tensor: torch.Tensor, value: float = NAN) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[tensor.numel() // 2] = value
    return tensor


class Encoded(Exception):
    """Raised in place of the MLLM forward: the test is about what happens before it."""


def _stop(*args, **kwargs):
    raise Encoded


def encode_instruction(pack, mllm, instruction="make the sky purple", size_level=64, **optional):
    return run_node(pack, "Step1XEditInstructionEncode", mllm=mllm, instruction=instruction, negative_prompt="",
                    size_level=size_level, **optional)[0]


# --------------------------------------------------------------------------------------------- NaN / Inf


def test_instruction_encode_refuses_a_nan_image(pack, mllm):
    with pytest.raises(ValueError, match=r"^image holds 1 NaN or infinite value\(s\) out of"):
        encode_instruction(pack, mllm, image=poisoned(image(64, 48)))


def test_vae_encode_refuses_an_infinite_pixel(pack, vae):
    with pytest.raises(ValueError, match=r"^image holds 1 NaN or infinite"):
        run_node(pack, "Step1XEditVAEEncode", vae=vae, image=poisoned(image(64, 48), float("inf")))


def test_vae_decode_refuses_a_nan_latent(pack, vae):
    with pytest.raises(ValueError, match=r"^samples holds 1 NaN or infinite"):
        run_node(pack, "Step1XEditVAEDecode", vae=vae, samples={"samples": poisoned(random_latent())})


def test_the_vae_object_refuses_a_nan_latent_from_comfyuis_own_decode_node(vae):
    with pytest.raises(ValueError, match=r"^the latent to decode holds 1 NaN"):
        vae.decode(poisoned(random_latent()))


@pytest.mark.parametrize("name", ["reference_image", "reference_latent", "init_latent", "mask"])
def test_the_sampler_names_the_input_that_holds_nan(pack, dit, vae, name):
    inputs = {"reference_image": image(64, 48), "vae": vae}
    if name == "reference_image":
        inputs["reference_image"] = poisoned(inputs["reference_image"])
    elif name == "reference_latent":
        inputs = {"reference_latent": {"samples": poisoned(random_latent())}}
    elif name == "init_latent":
        inputs["init_latent"] = {"samples": poisoned(random_latent())}
    else:
        inputs["mask"] = poisoned(torch.ones(1, 48, 64))
    with pytest.raises(ValueError, match=rf"^{name} holds 1 NaN or infinite"):
        sample(pack, dit, bind(pack, dit, fake_embeds(pack)), denoise=0.5, **inputs)


@pytest.mark.parametrize("name", ["image", "mask"])
def test_resize_names_the_input_that_holds_nan(pack, name):
    inputs = {"image": image(64, 48), "mask": torch.ones(1, 48, 64)}
    inputs[name] = poisoned(inputs[name])
    with pytest.raises(ValueError, match=rf"^{name} holds 1 NaN"):
        run_node(pack, "Step1XEditResize", size_level=64, resample="lanczos", **inputs)


def test_restore_size_refuses_a_nan_result(pack):
    with pytest.raises(ValueError, match=r"^image holds 1 NaN"):
        run_node(pack, "Step1XEditRestoreSize", image=poisoned(image(64, 48)), original=image(80, 60),
                 resample="bicubic")


# ----------------------------------------------------------------------------------------------- ranges


def test_image_values_outside_0_1_are_clamped_before_encoding(pack, vae):
    pixels = image(64, 48) * 1.6 - 0.3
    encoded = run_node(pack, "Step1XEditVAEEncode", vae=vae, image=pixels)[0]["samples"]
    clamped = run_node(pack, "Step1XEditVAEEncode", vae=vae, image=pixels.clamp(0, 1))[0]["samples"]
    torch.testing.assert_close(encoded, clamped, rtol=0, atol=0)


def test_mask_values_outside_0_1_are_clamped(pack):
    mask = torch.full((1, 48, 64), 3.0)
    mask[:, :, :32] = -2.0
    out = run_node(pack, "Step1XEditResize", image=image(64, 48), size_level=64, resample="lanczos", mask=mask)[1]
    assert out.min() == 0.0 and out.max() == 1.0


# --------------------------------------------------------------------------------------------- warnings


def test_an_empty_instruction_runs_with_a_warning(pack, mllm, caplog):
    with caplog.at_level(logging.WARNING, logger="step1x_edit"):
        embeds = encode_instruction(pack, mllm, instruction="  ", image=image(64, 48))
    assert embeds.cond.llm_embedding.shape[0] == 1
    assert any("the instruction is empty" in r.getMessage() for r in caplog.records)


def test_a_typed_image_placeholder_is_refused_before_the_mllm_runs(pack, mllm, monkeypatch):
    monkeypatch.setattr(type(mllm.encoder), "encode_pair", _stop)
    with pytest.raises(ValueError, match=r"contains <\|image_pad\|>, a placeholder reserved"):
        encode_instruction(pack, mllm, instruction="put <|image_pad|> here", image=image(64, 48))


def test_a_size_level_that_upscales_many_times_is_logged_with_how_to_cancel(pack, mllm, caplog, monkeypatch):
    monkeypatch.setattr(type(mllm.encoder), "encode_pair", _stop)
    with caplog.at_level(logging.WARNING, logger="step1x_edit"), pytest.raises(Encoded):
        encode_instruction(pack, mllm, size_level=1104, image=image(32, 24))
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "upscales the 32x24 image" in text and "Press Cancel" in text


def test_a_size_level_too_small_for_the_image_names_the_smallest_that_works(pack, mllm):
    with pytest.raises(ValueError, match=r"Use size_level 83 or more for this image"):
        encode_instruction(pack, mllm, size_level=64, image=image(480, 16))


# --------------------------------------------------------------------------------------------- denoise 0


def test_denoise_0_returns_the_reference_as_the_library_does(pack, dit):
    reference = random_latent()
    out = sample(pack, dit, bind(pack, dit, fake_embeds(pack)), denoise=0.0, reference_latent={"samples": reference})
    torch.testing.assert_close(out["samples"], reference, rtol=0, atol=1e-6)
    embeds = fake_embeds(pack)
    model_space = lib("graph_io").latent_to_model_space(reference)
    library = lib("sampling.denoise").denoise(dit.model, torch.zeros_like(reference), embeds.cond, embeds.uncond,
                                              reference=model_space, strength=0.0, compute_dtype=torch.float32)
    torch.testing.assert_close(library, model_space, rtol=0, atol=0)


def test_the_sampler_declares_denoise_0_allowed(pack):
    spec = pack.NODE_CLASS_MAPPINGS["Step1XEditSampler"].INPUT_TYPES()["required"]["denoise"][1]
    assert spec["min"] == 0.0
