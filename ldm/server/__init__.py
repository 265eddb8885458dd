"""`ldm serve`: the AUTOMATIC1111 web API over ldm's request type and denoising core (`ldm.server.app`)."""
