"""Decoding images from bytes into uint8 RGB arrays, defensively.

Inputs come from the internet: truncated files, HTML error pages saved as .jpg, CMYK and
16-bit scans, palette PNGs, animated GIFs, EXIF-rotated phone photos and decompression
bombs. `decode_image` either returns a clean [H, W, 3] uint8 array or raises
`ImageError` with a reason that ends up in the errors table.
"""

import io

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 100_000_000  # refuse larger images before decoding them (bombs)
MIN_SIDE = 16  # smaller images cannot hold a single stride-16 feature
# PIL's own bomb check is a process-wide setting; decode_image applies `max_pixels` per call
# instead, from the header, before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An image that cannot be used; `stage` says where it failed (decode, size, ...)."""

    def __init__(self, message, stage="decode"):
        super().__init__(message)
        self.stage = stage


def decode_image(data, max_pixels=DEFAULT_MAX_PIXELS, min_side=MIN_SIDE):
    """bytes -> uint8 RGB [H, W, 3], EXIF orientation applied; raises ImageError."""
    return decode_image_limited(data, None, max_pixels, min_side)[0]


def decode_image_limited(data, max_side, max_pixels=DEFAULT_MAX_PIXELS, min_side=MIN_SIDE):
    """bytes -> (uint8 RGB [h, w, 3] with largest side at most `max_side`, original (W, H)).

    JPEGs are decoded at a reduced DCT scale when that is enough (PIL's draft mode), which
    makes large photos several times cheaper; the rest is area-resized. The original size
    is the displayed one (after EXIF orientation).
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
                "(decompression-bomb guard; raise max_pixels to allow it)",
                stage="size",
            )
        if max_side and max(width, height) > max_side and image.format == "JPEG":
            factor = max_side / max(width, height)
            image.draft("RGB", (max(1, int(width * factor)), max(1, int(height * factor))))
        image.load()
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        # PIL's message names a BytesIO object; what the bytes start with is more telling
        # (HTML error pages, JSON, text saved under an image name)
        raise ImageError(f"cannot decode: not an image format PIL knows (starts with {data[:16]!r})") from e
    except Exception as e:
        raise ImageError(f"cannot decode: {type(e).__name__}: {e}") from e
    rotated = False
    try:
        rotated = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        image = ImageOps.exif_transpose(image)
    except Exception:
        pass  # a broken EXIF block does not make the pixels unusable
    original = (height, width) if rotated else (width, height)
    if min(original) < min_side:
        raise ImageError(f"image is {original[0]}x{original[1]}, under {min_side} px on a side", stage="size")
    array = to_rgb(image)
    h, w = array.shape[:2]
    if max_side and max(h, w) > max_side:
        factor = max_side / max(h, w)
        array = cv2.resize(array, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
    return array, original


def to_rgb(image):
    """A PIL image of any mode -> uint8 RGB array (first frame of animations)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = np.nanmin(array), np.nanmax(array)
        gray = ((array - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # transparent pixels on white, as viewers show them
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def read_image(path, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode a local or fsspec path."""
    if "://" in str(path):
        import fsspec

        with fsspec.open(str(path), "rb") as f:
            data = f.read()
    else:
        with open(path, "rb") as f:
            data = f.read()
    return decode_image(data, max_pixels=max_pixels)
