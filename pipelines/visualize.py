"""Pictures of results: matches drawn between two images, and contact sheets of clusters
and label suspects (`delf-index query --visualize`, `delf-index match`)."""

import html
import os

import cv2
import numpy as np

from delf_index.errors import UserError
from delf_index.runtime.images import read_image


def draw_matches(query_image, match_image, query_xy, match_xy, title=""):
    """Both images side by side (same height), inlier correspondences as lines; RGB uint8."""
    height = 480
    scale_q = height / query_image.shape[0]
    scale_m = height / match_image.shape[0]
    left = cv2.resize(
        query_image, (max(1, round(query_image.shape[1] * scale_q)), height), interpolation=cv2.INTER_AREA
    )
    right = cv2.resize(
        match_image, (max(1, round(match_image.shape[1] * scale_m)), height), interpolation=cv2.INTER_AREA
    )
    canvas = np.concatenate([left, np.full((height, 8, 3), 255, np.uint8), right], axis=1)
    offset = left.shape[1] + 8
    if query_xy is not None:
        rng = np.random.default_rng(0)
        for (xq, yq), (xm, ym) in zip(query_xy, match_xy):
            colour = tuple(int(c) for c in rng.integers(60, 255, 3))
            p = (int(round((xq + 0.5) * scale_q - 0.5)), int(round((yq + 0.5) * scale_q - 0.5)))
            q = (int(round((xm + 0.5) * scale_m - 0.5)) + offset, int(round((ym + 0.5) * scale_m - 0.5)))
            cv2.line(canvas, p, q, colour, 1, cv2.LINE_AA)
            cv2.circle(canvas, p, 3, colour, -1, cv2.LINE_AA)
            cv2.circle(canvas, q, 3, colour, -1, cv2.LINE_AA)
    if title:
        (w, h), _ = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1)
        cv2.rectangle(canvas, (0, 0), (w + 20, h + 16), (0, 0, 0), -1)  # legible on any photo
        cv2.putText(canvas, title, (10, h + 8), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def save_png(path, rgb):
    if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def thumbnail(image, height=128):
    """`image` scaled to `height` pixels (RGB uint8)."""
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def contact_sheet(rows, height=128, max_width=1600):
    """One RGB picture of rows of (caption, [images]): a dark caption band over each row of
    thumbnails, cut at `max_width`."""
    bands = []
    for caption, images in rows:
        thumbs = [thumbnail(im, height) for im in images] or [np.full((height, height, 3), 40, np.uint8)]
        strip = np.concatenate([np.pad(t, ((0, 0), (0, 4), (0, 0)), constant_values=255) for t in thumbs], axis=1)
        strip = strip[:, :max_width]
        strip = np.pad(strip, ((0, 0), (0, max_width - strip.shape[1]), (0, 0)), constant_values=255)
        band = np.zeros((26, max_width, 3), np.uint8)
        cv2.putText(band, caption[:150], (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        bands += [band, strip, np.full((6, max_width, 3), 255, np.uint8)]
    return np.concatenate(bands) if bands else np.full((height, max_width, 3), 255, np.uint8)


def readable(uri, cache):
    """The image at `uri`, or a grey tile with a cross when it cannot be read (a sheet is
    still worth having when a few originals moved)."""
    if uri not in cache:
        try:
            cache[uri] = read_image(uri)
        except (UserError, OSError):
            tile = np.full((128, 128, 3), 90, np.uint8)
            cv2.line(tile, (0, 0), (127, 127), (200, 60, 60), 2)
            cv2.line(tile, (0, 127), (127, 0), (200, 60, 60), 2)
            cache[uri] = tile
    return cache[uri]


def write_sheets(folder, sections):
    """`sections`: [(title, file name, [(caption, [uris])])] -> one PNG each and an index.html
    showing them with their captions. Returns the paths written."""
    os.makedirs(folder, exist_ok=True)
    cache, written, parts = {}, [], []
    for title, name, rows in sections:
        picture = contact_sheet([(caption, [readable(u, cache) for u in uris]) for caption, uris in rows])
        save_png(os.path.join(folder, name), picture)
        written.append(os.path.join(folder, name))
        items = "".join(f"<li>{html.escape(caption)}</li>" for caption, _ in rows)
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{name}' style='max-width:100%'><ol>{items}</ol>")
    page = "<!doctype html><meta charset='utf-8'><title>delf-index match</title><body style='font-family:sans-serif'>"
    with open(os.path.join(folder, "index.html"), "w") as f:
        f.write(page + "".join(parts) + "</body>")
    written.append(os.path.join(folder, "index.html"))
    return written
