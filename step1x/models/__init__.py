"""The networks: configs, DiT blocks, connector, VAE, embeddings, attention backends and casting ops."""
