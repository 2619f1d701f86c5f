"""Model files: reading safetensors, loading the DiT and VAE, LoRA files, finding model folders."""
