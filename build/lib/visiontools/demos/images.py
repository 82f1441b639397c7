"""Reading user images for the demo: any upload becomes an RGB PIL image or a clear error message,
and the bundled example photos (``visiontools/assets``) are listed here."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "visiontools" / "assets"
MAX_PIXELS = 40_000_000   # larger uploads are refused (decompression bombs, memory)
WORK_SIDE = 1024          # accepted images are downscaled so their longer side is at most this


class ImageInputError(ValueError):
    """An upload that cannot be used as an image; the message is meant for the user."""


def example_images() -> list[str]:
    """Paths of the bundled example photos (sorted, JPEG files in ``visiontools/assets``)."""
    return sorted(str(p) for p in ASSETS_DIR.glob("*.jpg"))


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"the image had an alpha channel ({im.mode}); it was placed on a white background")
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        notes.append(f"the image was greyscale with {im.mode} pixels; it was rescaled to 8 bits and copied to RGB")
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if im.mode in ("L", "1"):
        notes.append("the image was greyscale; its grey level was copied to the three RGB channels")
    elif im.mode != "P":
        notes.append(f"the image was in {im.mode} colour mode; it was converted to RGB")
    return im.convert("RGB")


def read_image(source) -> tuple[Image.Image, list[str]]:
    """Open an upload (a file path or a PIL image) as an RGB image of at most ``WORK_SIDE`` px on
    its longer side. Returns ``(image, notes)``, where notes say what was converted; raises
    :class:`ImageInputError` with a message for the user when the upload is not a usable image."""
    notes: list[str] = []
    if source is None:
        raise ImageInputError("No image given: upload an image or pick one of the examples.")
    if isinstance(source, Image.Image):
        im = source
        name = "the image"
    else:
        path = Path(os.fspath(source))
        name = path.name
        if not path.is_file():
            raise ImageInputError(f"The upload {name!r} could not be found on the server; please upload it again.")
        try:
            im = Image.open(path)
        except UnidentifiedImageError:
            raise ImageInputError(f"{name!r} is not an image file that can be read (supported: JPEG, PNG, "
                                  "WebP, GIF, BMP, TIFF).") from None
        except Image.DecompressionBombError:
            raise ImageInputError(f"{name!r} is too large to open safely.") from None
        except OSError as e:
            raise ImageInputError(f"{name!r} could not be opened as an image: {e}") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ImageInputError(f"{name!r} is too large: {w}x{h} = {w * h / 1e6:.0f} megapixels "
                              f"(the limit is {MAX_PIXELS / 1e6:.0f} megapixels). Please upload a smaller image.")
    if w < 1 or h < 1:
        raise ImageInputError(f"{name!r} is empty ({w}x{h} pixels).")
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
            notes.append("the image has several frames; the first one is used")
        # decode with the lowest resolution that keeps WORK_SIDE (JPEG draft mode), then fully load
        if im.format == "JPEG" and max(w, h) > 2 * WORK_SIDE:
            im.draft("RGB", (WORK_SIDE, WORK_SIDE))
        im.load()
        im = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError:
        raise ImageInputError(f"{name!r} is too large to decode safely.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"{name!r} is damaged or truncated and could not be decoded ({e}).") from None
    im = _to_rgb(im, notes)
    if max(im.size) > WORK_SIDE:
        im = im.copy()
        im.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.LANCZOS)
        notes.append(f"the image ({w}x{h}) was downscaled to {im.size[0]}x{im.size[1]} for the demo")
    return im, notes


def square_crop(im: Image.Image) -> Image.Image:
    """The largest centred square of ``im`` (what a square-input ViT sees)."""
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def square_resized(im: Image.Image, width: int, height: int) -> Image.Image:
    """The centred square of ``im`` in RGB, resized (bicubic) to ``width x height``."""
    return square_crop(im.convert("RGB")).resize((width, height), Image.Resampling.BICUBIC)
