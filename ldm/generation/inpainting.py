"""Inpainting and outpainting as AUTOMATIC1111 does them, the pieces the pipeline (`ldm.generation.pipeline`) puts
together: masks at the image's and the latents' size, "fill" and the latent contents of the area to repaint, the
extra UNet input of an inpainting model, "inpaint only masked" (the mask's box worked on at full size and pasted
back), outpainting as inpainting on a larger canvas, and the denoiser that holds an ordinary model to the known
latents.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

from ldm import accel
from ldm.generation.images import fit_init_image, to_pil
from ldm.generation.request import Generation


def as_pil(image: Image.Image | Tensor) -> Image.Image:
    """An init image, PIL or a tensor (3, H, W) / (1, 3, H, W) in [-1, 1], as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return to_pil(image[None] if image.ndim == 3 else image)[0]


def outpainted(request: Generation) -> Generation:
    """An outpainting request as the inpainting request it is: the init image on a larger canvas, its edge pixels
    stretched into the new border, and a mask that repaints the border (and what the given mask repaints)."""
    left, top, right, bottom = request.outpaint
    image = as_pil(request.init_image)
    if request.width is not None or request.height is not None:
        image = fit_init_image(image, request.width, request.height, 8)
    pixels = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(pixels.shape[:2], 255, dtype=np.uint8)
    inner = np.zeros((image.height, image.width), dtype=np.uint8)
    if request.mask is not None:
        given = request.mask if isinstance(request.mask, Image.Image) else to_pil(request.mask)[0]
        inner = np.asarray(given.convert("L").resize(image.size, Image.Resampling.LANCZOS))
        if request.mask_invert:
            inner = 255 - inner
    mask[top:top + image.height, left:left + image.width] = inner
    return request.replace(init_image=Image.fromarray(pixels), mask=Image.fromarray(mask), mask_invert=False,
                           outpaint=(0, 0, 0, 0), width=None, height=None)


def inpainting_input(sd, request: Generation, pixels: Tensor | None, masks, width: int, height: int) -> Tensor:
    """What an inpainting model's UNet takes beside the latents, (1, 1 + 4, h, w): the mask at latent size (1 =
    repaint; all 1 without a mask) and the latents of the image with the area to repaint set to 0 (grey), the
    posterior's mean (CompVis' `LatentInpaintDiffusion`, A1111's image conditioning), from `pixels`, the init image;
    txt2img (no `pixels`): an all-grey image."""
    f = sd.config.vae.downsample_factor
    if pixels is not None:
        repaint = (torch.ones(1, 1, height, width) if masks is None
                   else (torch.from_numpy(np.asarray(masks[0], dtype=np.float32) / 255) >= 0.5).float()[None, None])
    else:
        pixels, repaint = torch.zeros(1, 3, height, width), torch.ones(1, 1, height, width)
    masked = pixels * (1 - repaint)
    latents = sd.vae.encode(masked.to(sd.device), tiled=request.vae_tiling, tile_size=request.vae_tile_size).mean
    accel.release(sd.vae)
    mask = F.interpolate(repaint, size=(height // f, width // f)).to(sd.device)
    return torch.cat([mask, latents.float() * sd.scale_factor], dim=1)


def only_masked(sd, request: Generation):
    """A1111's "inpaint only masked": the request on the mask's bounding box plus `inpaint_padding`, grown to the
    working size's aspect ratio and scaled to it; and the function that puts a result back into the whole image
    (scaled to the box, pasted through the feathered mask, so that every pixel outside it stays as it was)."""
    image = as_pil(request.init_image)
    mask = (request.mask if isinstance(request.mask, Image.Image) else to_pil(request.mask)[0]).convert("L")
    mask = mask.resize(image.size, Image.Resampling.LANCZOS) if mask.size != image.size else mask
    if request.mask_invert:
        mask = ImageOps.invert(mask)
    box = mask.getbbox()
    if box is None:  # nothing to repaint: the image as it is
        return request.replace(inpaint_area="whole"), None
    work = (request.width or sd.config.image_size, request.height or sd.config.image_size)
    box = grow(box, request.inpaint_padding, work, image.size)
    inner = request.replace(init_image=image.crop(box).resize(work, Image.Resampling.LANCZOS),
                            mask=mask.crop(box).resize(work, Image.Resampling.LANCZOS), mask_invert=False,
                            inpaint_area="whole", width=None, height=None)
    feather = mask.filter(ImageFilter.GaussianBlur(request.mask_blur)) if request.mask_blur else mask

    def paste_back(result: Image.Image) -> Image.Image:
        whole = image.copy()
        region = result.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.LANCZOS)
        whole.paste(Image.composite(region, image.crop(box), feather.crop(box)), box[:2])
        return whole
    return inner, paste_back


def grow(box: tuple[int, int, int, int], padding: int, work: tuple[int, int],
         size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box plus `padding` on every side, then widened or heightened to `work`'s aspect ratio, within `size`."""
    x0, y0, x1, y1 = max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, size[0]), \
        min(box[3] + padding, size[1])
    ratio = work[0] / work[1]
    w, h = x1 - x0, y1 - y0
    if w / h < ratio:  # too narrow: widen around its centre
        extra = min(round(h * ratio) - w, size[0] - w)
        x0 = min(max(x0 - extra // 2, 0), size[0] - (w + extra))
        x1 = x0 + w + extra
    else:
        extra = min(round(w / ratio) - h, size[1] - h)
        y0 = min(max(y0 - extra // 2, 0), size[1] - (h + extra))
        y1 = y0 + h + extra
    return x0, y0, x1, y1


class MaskedDenoiser:
    """A denoiser whose x_0 prediction is the known latents where `keep` is 1 (A1111's inpainting with an ordinary
    model: the prediction, not x, is blended, so every sampler keeps the known area on its path)."""

    def __init__(self, inner, known: Tensor, keep: Tensor):
        self.inner, self.known, self.keep = inner, known, keep

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # log_sigmas and the like

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.known * self.keep + self.inner(x, sigma) * (1 - self.keep)


def masks_for(sd, request: Generation, width: int, height: int) -> tuple[Image.Image, Tensor, Tensor]:
    """The inpainting mask at the image's size: (the blurred mask for the final composite, PIL "L"; the sharp
    mask (1, 1, H, W), 1 = repaint; the latent mask (1, 1, h, w) of what to keep, 1 = keep, binarised as A1111)."""
    mask = request.mask
    if isinstance(mask, Tensor):
        mask = to_pil((mask.reshape(1, 1, *mask.shape[-2:]).float() * 2 - 1).expand(1, 3, -1, -1))[0]
    mask = mask.convert("L")
    if mask.size != (width, height):
        warnings.warn(f"the mask is {mask.size[0]}x{mask.size[1]} and the image {width}x{height}: the mask is "
                      "resized to the image", stacklevel=2)
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    if request.mask_invert:
        mask = ImageOps.invert(mask)
    blurred = mask.filter(ImageFilter.GaussianBlur(request.mask_blur)) if request.mask_blur else mask
    sharp = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    f = sd.config.vae.downsample_factor
    latent = torch.from_numpy(np.asarray(blurred.resize((width // f, height // f)), dtype=np.float32) / 255)
    keep = 1 - latent.round()[None, None]
    return blurred, sharp, keep.to(sd.device)


def fill(pixels: Tensor, repaint: Tensor) -> Tensor:
    """A1111's "fill": the area to repaint painted with the mean colour of the image (an approximation of its
    repeated blurring of the known colours into the hole)."""
    mean = pixels.mean(dim=(2, 3), keepdim=True)
    return pixels * (1 - repaint) + mean * repaint
