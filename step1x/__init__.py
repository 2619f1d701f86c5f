"""Step1X-Edit in plain PyTorch: the DiT with its connector, the FLUX VAE, the Qwen2.5-VL instruction
encoder and the official sampler. Never imports ComfyUI.

    from step1x import Step1XPipeline, EditOptions
    pipe = Step1XPipeline.from_files("step1x-edit-v1p1-official.safetensors", "vae.safetensors",
                                     "Qwen2.5-VL-7B-Instruct", offload=True)
    pipe.edit(image, "make the sky purple", EditOptions(seed=42)).save("out.png")
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Step1XPipeline": "pipeline",
    "EditOptions": "pipeline",
    "ReasoningOptions": "pipeline_v12",
    "Step1XEdit": "models.model",
    "AutoEncoder": "models.autoencoder",
    "DiTParams": "models.configs",
    "AutoEncoderParams": "models.configs",
    "load_dit": "checkpoints.loading",
    "load_vae": "checkpoints.loading",
    "inspect_dit": "checkpoints.loading",
    "denoise": "sampling.denoise",
    "TextConditioning": "sampling.denoise",
    "load_text_encoder": "encoder",
    "CheckpointError": "checkpoints.safetensors_file",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'step1x' has no attribute {name!r}")
