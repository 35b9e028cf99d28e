"""Decoding images into uint8 RGB arrays, defensively, and the one way images are prepared
for extraction.

Inputs come from the internet: truncated files, HTML error pages saved as .jpg, CMYK and
16-bit scans, palette PNGs, animated GIFs, EXIF-rotated phone photos and decompression
bombs. `decode_image` either returns a clean [H, W, 3] uint8 array or raises
`ImageError` with a reason that ends up in the errors table.

`prepare_for_extraction` is what the extract job does to every database image and what a
query goes through, whether it comes as a path, bytes or an array: decode (JPEGs at a
reduced DCT scale when that is enough), shrink to the extractor's largest side with area
interpolation, and remember the original size that keypoints are reported in.
"""

import io
import os
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from delf_index.errors import UserError
from delf_index.runtime import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 100_000_000  # refuse larger images before decoding them (bombs)
MIN_SIDE = 16  # smaller images cannot hold a single stride-16 feature
# PIL's own bomb check is a process-wide setting; decode_image applies `max_pixels` per call
# instead, from the header, before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None


class ImageError(UserError):
    """An image that cannot be used; `stage` says where it failed (decode, size, ...)."""

    def __init__(self, message, stage="decode"):
        super().__init__(message)
        self.stage = stage


def decode_image(data, max_pixels=DEFAULT_MAX_PIXELS, min_side=MIN_SIDE):
    """bytes -> uint8 RGB [H, W, 3], EXIF orientation applied; raises ImageError."""
    return decode_for_extraction(data, None, max_pixels, min_side)[0]


def decode_for_extraction(data, max_side, max_pixels=DEFAULT_MAX_PIXELS, min_side=MIN_SIDE, noted=None):
    """bytes -> (uint8 RGB [h, w, 3] with largest side at most `max_side`, original (W, H)).

    JPEGs are decoded at a reduced DCT scale when that is enough (PIL's draft mode), which
    makes large photos several times cheaper; the rest is area-resized. The original size
    is the displayed one (after EXIF orientation). The decoder's warnings ("Corrupt EXIF
    data", "Truncated File Read") are not printed: they go to the list `noted`, for the
    image's record.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return _decode(data, max_side, max_pixels, min_side)
        finally:
            if noted is not None:
                noted.extend(dict.fromkeys(str(w.message) for w in caught))


def _decode(data, max_side, max_pixels, min_side):
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
    return shrink_to(to_rgb(image), max_side), original


def shrink_to(image, max_side):
    """`image` with its largest side at most `max_side` (area interpolation); None: as it is.
    The extractor shrinks the same way, so an image shrunk here is not resized again."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image
    factor = max_side / max(h, w)
    return cv2.resize(image, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)


def prepare_for_extraction(image, max_side, max_pixels=DEFAULT_MAX_PIXELS):
    """(uint8 RGB array with its largest side at most `max_side`, original (width, height))
    of an image given as a path or URI, encoded bytes or a uint8 RGB array [H, W, 3]."""
    if isinstance(image, np.ndarray):
        check_rgb(image)
        if min(image.shape[:2]) < MIN_SIDE:  # refused as a database image would be
            raise ImageError(f"image is {image.shape[1]}x{image.shape[0]}, under {MIN_SIDE} px on a side", "size")
        return shrink_to(image, max_side), (image.shape[1], image.shape[0])
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_for_extraction(bytes(image), max_side, max_pixels)
    if isinstance(image, (str, os.PathLike)):
        uri = os.fspath(image)
        try:
            return decode_for_extraction(storage.read_bytes(uri), max_side, max_pixels)
        except ImageError as e:
            raise ImageError(f"{uri}: {e}", e.stage) from e
    raise TypeError(f"an image is a path, bytes or a uint8 RGB array, not {type(image).__name__}")


def check_rgb(image):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}", stage="decode")


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


def read_image(uri, max_pixels=DEFAULT_MAX_PIXELS):
    """The full-size image at a local path or fsspec URI (for display; extraction shrinks it
    through `prepare_for_extraction`)."""
    return decode_image(storage.read_bytes(os.fspath(uri)), max_pixels=max_pixels)
