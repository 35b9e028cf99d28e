"""Decoding: every odd input is either converted correctly or refused with a reason."""

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.images import ImageError, decode_image


def encode(image, fmt, **kwargs):
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def test_plain_formats(photo):
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF"):
        out = decode_image(encode(photo, fmt))
        assert out.shape == (48, 64, 3) and out.dtype == np.uint8, fmt


def test_modes_are_converted_to_rgb(photo):
    gray = decode_image(encode(photo.convert("L"), "PNG"))
    assert gray.shape == (48, 64, 3) and (gray[..., 0] == gray[..., 1]).all()
    cmyk = decode_image(encode(photo.convert("CMYK"), "JPEG"))
    assert cmyk.shape == (48, 64, 3)
    palette = photo.convert("P")
    assert decode_image(encode(palette, "PNG")).shape == (48, 64, 3)
    sixteen = Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16))
    out = decode_image(encode(sixteen, "PNG"))
    assert out.shape == (48, 64, 3) and out.max() > 200  # scaled from 16 bits, not clipped
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)
    assert (decode_image(encode(rgba, "PNG")) == 255).all()  # transparent shows as white


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out = decode_image(encode(photo, "JPEG", exif=exif))
    assert out.shape == (64, 48, 3)


def test_animated_gif_gives_first_frame(photo):
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data).shape == (48, 64, 3)


@pytest.mark.parametrize(
    "data,stage,reason",
    [
        (b"", "decode", "empty"),
        (b"<html><body>404 Not Found</body></html>", "decode", "cannot decode"),
        (b"just some text saved as photo.jpg\n" * 10, "decode", "cannot decode"),
    ],
)
def test_bad_bytes(data, stage, reason):
    with pytest.raises(ImageError, match=reason) as e:
        decode_image(data)
    assert e.value.stage == stage


def test_truncated_jpeg(photo):
    data = encode(photo, "JPEG")
    with pytest.raises(ImageError, match="cannot decode"):
        decode_image(data[: len(data) // 2])


def test_tiny_and_huge_images():
    with pytest.raises(ImageError, match="under 16 px") as e:
        decode_image(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert e.value.stage == "size"
    bomb = encode(Image.new("1", (12000, 12000)), "PNG")  # 144 Mpixel in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="over the limit") as e:
        decode_image(bomb)
    assert e.value.stage == "size"
    assert decode_image(bomb, max_pixels=200_000_000).shape == (12000, 12000, 3)
