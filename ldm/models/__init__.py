"""Networks and weights: the UNet, the VAE, the CLIP text encoders and the checkpoint loader."""
