"""txt2img and img2img: the request, the denoising loop, images and their PNG parameters."""
