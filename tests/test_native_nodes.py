"""The native-path nodes that are plain tensors (Encode, Sigmas) through the headless bridge, and the MODEL nodes'
answer outside ComfyUI. Inside a real ComfyUI they are tested by test_native_comfyui.py."""

import importlib
import inspect
from types import SimpleNamespace

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


def test_the_model_loader_has_the_dit_loaders_widgets_and_takes_each_of_them(pack):
    loader = pack.NODE_CLASS_MAPPINGS["Step1XEditModelLoader"]
    types = loader.INPUT_TYPES()
    assert types == pack.NODE_CLASS_MAPPINGS["Step1XEditDiTLoader"].INPUT_TYPES()
    parameters = inspect.signature(getattr(loader, loader.FUNCTION)).parameters
    assert [*types["required"], *types["optional"]] == [name for name in parameters if name != "self"]


@pytest.fixture
def native_loader(pack, monkeypatch):
    """The Model Loader with ComfyUI's model wrapper replaced by the bare DiT (the wrapping is tested in a real
    ComfyUI, by test_native_comfyui.py)."""
    native = importlib.import_module(f"{pack.__name__}.nodes.native")
    wrapper = SimpleNamespace(native_model=lambda dit, dtype, load_device, offload_device: dit)
    monkeypatch.setattr(native, "_native", lambda: wrapper)
    return lambda **widgets: run_node(pack, "Step1XEditModelLoader", **widgets)[0]


def test_the_model_loader_switches_an_fp8_model_to_fp8_matmuls(native_loader, model_names):
    dit = native_loader(unet_name=model_names["dit"], weight_dtype="fp8_e4m3fn", attention="sdpa", fp8_matmul=True)
    assert lib("models.fp8_matmul").uses_fp8_matmul(dit) and not lib("models.compile").is_compiled(dit)


def test_the_model_loader_compiles_the_blocks_when_asked(native_loader, model_names):
    dit = native_loader(unet_name=model_names["dit"], weight_dtype="default", attention="sdpa", compile=True)
    assert lib("models.compile").is_compiled(dit) and not lib("models.fp8_matmul").uses_fp8_matmul(dit)


def test_the_model_loader_leaves_both_off_by_default_and_refuses_fp8_matmul_on_full_precision(native_loader,
                                                                                            model_names):
    dit = native_loader(unet_name=model_names["dit"], weight_dtype="default", attention="sdpa")
    assert not lib("models.compile").is_compiled(dit) and not lib("models.fp8_matmul").uses_fp8_matmul(dit)
    with pytest.raises(lib("models.fp8_matmul").Fp8MatmulError, match="weight_dtype to fp8_e4m3fn"):
        native_loader(unet_name=model_names["dit"], weight_dtype="bf16", attention="sdpa", fp8_matmul=True)


def test_the_renorm_threshold_is_checked(pack):
    with pytest.raises(ValueError, match="renorm_threshold must be within"):
        run_node(pack, "Step1XEditCFGRenorm", model=None, renorm_threshold=1.5)


# ----------------------------------------------------------------------------------------------------- v1.2

V12 = "Step1X-Edit-v1p2"


@pytest.fixture(scope="module")
def v12_mllm(pack, bridge, tiny_v12_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("native-v12-models")
    (root / "diffusion_models").mkdir()
    (root / "diffusion_models" / V12).symlink_to(tiny_v12_folder, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(bridge._HEADLESS_FOLDERS, "diffusion_models",
                      [*bridge._HEADLESS_FOLDERS.get("diffusion_models", []), root / "diffusion_models"])
        yield run_node(pack, "Step1XEditMLLMLoader", mllm_name=V12, dtype="fp32", device="default")[0]


def test_encode_with_the_v12_encoder_gives_v12_conditioning(pack, v12_mllm, vae, picture):
    embeds = run_node(pack, "Step1XEditInstructionEncode", mllm=v12_mllm, instruction="make it red",
                      negative_prompt="", size_level=SIZE_LEVEL, image=picture)[0]
    positive, negative, latent = run_node(pack, "Step1XEditEncode", mllm=v12_mllm, instruction="make it red",
                                          negative_prompt="", size_level=SIZE_LEVEL, image=picture, vae=vae)
    for conditioning, (side,) in ((positive, embeds.cond), (negative, embeds.uncond)):
        tensor, entries = conditioning[0]
        assert torch.equal(tensor, side.llm_embedding) and torch.equal(entries["step1x_mask"], side.mask)
        assert torch.equal(entries["step1x_txt_ids"], side.txt_ids)
        assert torch.equal(entries["step1x_text_embeds"], side.text_embeds)
        assert torch.equal(entries["step1x_text_mask"], side.text_mask)
    assert positive[0][0].shape[1] != negative[0][0].shape[1], "each side at its own length"
    pixels = lib("sampling.v12").vae_input_pixels(picture.movedim(-1, 1), embeds.working_size)
    expected = vae.encode(((pixels + 1) / 2).clamp(0, 1).movedim(1, -1))
    assert torch.equal(latent["samples"], expected)
    assert torch.equal(positive[0][1]["reference_latents"][0], expected)


def test_v12_texts_of_several_images_are_padded_and_each_row_cuts_back_to_its_own(pack):
    native = __import__(f"{pack.__name__}.nodes.native", fromlist=["padded"])
    text = lib("sampling.calls").TextConditioning
    g = torch.Generator().manual_seed(4)

    def side(n):
        return text(torch.randn(1, n, 8, generator=g), torch.ones(1, n, dtype=torch.long),
                    torch.randn(1, n, 3, generator=g), torch.randn(1, n, 8, generator=g),
                    torch.randint(0, 2, (1, n), generator=g))

    short, long = side(5), side(9)
    both = native.padded([short, long])
    assert both.llm_embedding.shape == (2, 9, 8) and both.mask[0].tolist() == [1] * 5 + [0] * 4
    for i, original in enumerate((short, long)):
        row = both.row(i)
        for field in ("llm_embedding", "mask", "txt_ids", "text_embeds", "text_mask"):
            assert torch.equal(getattr(row, field), getattr(original, field)), field
