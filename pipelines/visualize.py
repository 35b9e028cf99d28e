"""Pictures of results: matches drawn between two images, contact sheets of clusters and
label suspects (`delf-index query --visualize`, `delf-index match`), and HTML pages of
ranked results as thumbnails (evaluate's report.html, search's results.html).

A page is one self-contained folder: the .html and a thumbs/ folder of small JPEGs, so that it
opens from a laptop, a bucket's console or a CI artifact alike."""

import hashlib
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


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; } td, th { padding: .3em .7em; border-bottom: 1px solid #ddd; }
th { text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; gap: .6em; align-items: flex-start; margin: .8em 0; flex-wrap: wrap; }
figure { margin: 0; text-align: center; font-size: .8em; }
figure img { height: 120px; border: 4px solid #ccc; border-radius: 3px; display: block; }
figure.query img { border-color: #333; } figure.good img { border-color: #2a9d3a; }
figure.bad img { border-color: #d33; } figcaption { max-width: 180px; overflow-wrap: anywhere; }
"""


def thumbnails(folder, uris, height=240):
    """{uri: path relative to `folder`} of a JPEG thumbnail of each image under folder/thumbs
    (an unreadable image gets a crossed tile)."""
    os.makedirs(os.path.join(folder, "thumbs"), exist_ok=True)
    out, cache = {}, {}
    for uri in dict.fromkeys(uris):
        name = os.path.join("thumbs", hashlib.sha1(uri.encode()).hexdigest()[:16] + ".jpg")
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            small = thumbnail(readable(uri, cache), height)
            cv2.imwrite(path, cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
            cache.clear()
        out[uri] = name
    return out


def figure(src, caption, kind=""):
    """One framed thumbnail: `kind` "query", "good" (a right or verified result) or "bad"."""
    return (
        f"<figure class='{kind}'><img src='{html.escape(src)}' alt='{html.escape(caption)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def write_page(path, title, body):
    """A page of `body` (HTML) with the shared style."""
    with open(path, "w") as f:
        f.write(
            f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><body><h1>{html.escape(title)}</h1>{body}</body></html>"
        )
    return path


def html_table(header, rows, numeric=()):
    """An HTML table; columns whose index is in `numeric` align right."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td class='{'n' if i in numeric else ''}'>{html.escape(str(v))}</td>" for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"
