"""Samplers, noise schedules, denoisers and guidance: everything between the UNet and the latents."""
