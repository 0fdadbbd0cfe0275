"""The offline encode job: images -> SD-VAE moments + DINOv2 tokens -> a cache (Ray)."""
