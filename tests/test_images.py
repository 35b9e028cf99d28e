"""Decoding: every odd input is either converted correctly or refused with a reason."""

import io

import numpy as np
import pytest
from PIL import Image

from delf_index.runtime.images import ImageError, decode_image


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


@pytest.fixture(scope="module")
def quadrants():
    """Four flat colours (red, green, blue, grey), so that colour conversions can be checked."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[:32, :32] = (220, 30, 30)
    image[:32, 32:] = (30, 200, 40)
    image[32:, :32] = (20, 40, 210)
    image[32:, 32:] = (128, 128, 128)
    return image


def quadrant_means(image):
    return np.array([image[r : r + 32, c : c + 32].reshape(-1, 3).mean(0) for r in (0, 32) for c in (0, 32)])


def test_modes_are_converted_to_rgb(photo, quadrants):
    gray = decode_image(encode(photo.convert("L"), "PNG"))
    assert gray.shape == (48, 64, 3) and (gray[..., 0] == gray[..., 1]).all()
    np.testing.assert_array_equal(gray[..., 0], np.asarray(photo.convert("L")))
    # CMYK JPEGs (print workflows) come back in their colours, not inverted or channel-swapped
    cmyk = decode_image(encode(Image.fromarray(quadrants).convert("CMYK"), "JPEG", quality=95))
    assert cmyk.shape == (64, 64, 3)
    np.testing.assert_allclose(quadrant_means(cmyk), quadrant_means(quadrants), atol=8)
    # a palette PNG of few colours is lossless: every pixel exactly as it was
    palette = Image.fromarray(quadrants).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert palette.mode == "P"
    np.testing.assert_array_equal(decode_image(encode(palette, "PNG")), quadrants)
    # 16 bits scaled to 8 (0..65535 -> 0..255), not clipped at 255
    values = np.arange(48 * 64).reshape(48, 64).astype(np.uint16) * 20
    out = decode_image(encode(Image.fromarray(values), "PNG"))
    assert out.shape == (48, 64, 3)
    np.testing.assert_allclose(out[..., 0], values / 65535 * 255, atol=0.51)
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
