"""Training: the accelerate loop, its configuration, EMA, latent caches and checkpoint export."""
