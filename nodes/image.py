"""Image nodes: the official size_level resize, the resize back, and VAE encode/decode with either VAE."""

from __future__ import annotations

from ..step1x.geometry import check_dims, size_level_dims
from ..step1x.graph_io import check_image, check_latent, resize_images, resize_masks
from .sockets import CATEGORY
from .vae import check_vae

RESIZE_FILTERS = ["lanczos", "bicubic", "bilinear", "nearest"]


class Resize:
    DESCRIPTION = ("Resizes an image (and optionally its mask) to the working size of the official editor: about "
                   "size_level x size_level pixels at the same aspect ratio, sides multiples of 16.")
    CATEGORY = CATEGORY
    FUNCTION = "resize"
    RETURN_TYPES = ("IMAGE", "MASK", "INT", "INT")
    RETURN_NAMES = ("IMAGE", "MASK", "width", "height")
    OUTPUT_TOOLTIPS = ("The resized image.", "The resized mask (all ones when no mask was given).",
                       "Working width in pixels.", "Working height in pixels.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image to resize."}),
                "size_level": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 16, "tooltip": (
                    "Target area about size_level x size_level pixels (official: 512 or 1024).")}),
                "resample": (RESIZE_FILTERS, {"default": "lanczos", "tooltip": (
                    "Filter: lanczos (later official code) or bicubic (first release).")}),
            },
            "optional": {"mask": ("MASK", {"tooltip": "A mask of the same image, resized along with it."})},
        }

    def resize(self, image, size_level, resample, mask=None):
        image = check_image(image)
        size = size_level_dims(image.shape[2], image.shape[1], size_level)
        if mask is None:
            out_mask = image.new_ones(image.shape[0], size[1], size[0])
        else:
            out_mask = resize_masks(mask, size)
        return (resize_images(image, size, resample), out_mask, size[0], size[1])


class RestoreSize:
    DESCRIPTION = "Resizes the edited image back to the size of the original, as the official editor does (bicubic)."
    CATEGORY = CATEGORY
    FUNCTION = "restore"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The image at the original size.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The edited image (at the working size)."}),
            "original": ("IMAGE", {"tooltip": "The original image; only its size is used."}),
            "resample": (RESIZE_FILTERS, {"default": "bicubic", "tooltip": "Filter (official: bicubic)."}),
        }}

    def restore(self, image, original, resample):
        original = check_image(original, "original")
        return (resize_images(image, (original.shape[2], original.shape[1]), resample),)


class VaeEncode:
    DESCRIPTION = ("Encodes an image at the working size to a 16-channel FLUX latent (raw, ComfyUI's convention), "
                   "e.g. for reference_latent or init_latent. Works with either VAE loader.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent (the mean of the VAE's Gaussian, as ComfyUI's VAE Encode).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE", {"tooltip": "The FLUX VAE: Step1X-Edit VAE loader or ComfyUI's Load VAE (ae.safetensors)."}),
            "image": ("IMAGE", {"tooltip": "An image whose sides are multiples of 16 (use Step1X-Edit Resize)."}),
        }}

    def encode(self, vae, image):
        check_vae(vae)
        image = check_image(image)
        check_dims(image.shape[2], image.shape[1])
        return ({"samples": vae.encode(image)},)


class VaeDecode:
    DESCRIPTION = "Decodes a Step1X-Edit LATENT to an image. Works with either VAE loader, like ComfyUI's VAE Decode."
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image at the working size.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE", {"tooltip": "The FLUX VAE: Step1X-Edit VAE loader or ComfyUI's Load VAE (ae.safetensors)."}),
            "samples": ("LATENT", {"tooltip": "The latent from the Step1X-Edit sampler."}),
        }}

    def decode(self, vae, samples):
        check_vae(vae)
        return (vae.decode(check_latent(samples, "samples")),)
