"""The built-in demo corpus: real photos from scikit-image under synthetic changes.

    python -m delf_index.pipelines.demo_corpus OUTPUT_DIR      # writes OUTPUT_DIR/images/*.jpg and groups.csv

Eight photos become eight "places": each appears as itself and under a viewpoint change
(perspective warp), a scale change (zoomed crop), an illumination change, occlusions and a
combination (rotation + scale + light); the two motorcycle photos are a real stereo pair and
count as one place. Other scikit-image photos are distractors. Everything is deterministic
(seeded), built at run time, and nothing is committed. groups.csv follows landmarks-dev's
format (image,group; empty group = distractor), so `delf-index evaluate --groups` reads it.
queries/ holds one more photo of each place, under a change of its own (viewpoint, scale and
light at once), that is in neither images/ nor groups.csv: a query the index has not seen.
"""

import csv
import os
import sys

import cv2
import numpy as np

PLACES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "motorcycle_left", "immunohistochemistry"]
DISTRACTORS = ["page", "text", "moon", "hubble_deep_field", "brick", "grass", "gravel", "cell", "retina", "horse"]
MAX_SIDE = 512


def load(name):
    # scikit-image is optional (the [demo] extra): only the demo needs its photos
    from skimage import data

    if name.startswith("motorcycle_"):
        image = data.stereo_motorcycle()[0 if name.endswith("left") else 1]
    else:
        image = np.asarray(getattr(data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)
    scale = MAX_SIDE / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)), cv2.INTER_AREA)
    return image


def viewpoint(image, rng, amount=0.25):
    h, w = image.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = src + rng.uniform(-amount, amount, (4, 2)).astype(np.float32) * np.float32([w, h])
    return cv2.warpPerspective(image, cv2.getPerspectiveTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT)


def zoom(image, rng, keep=0.4):
    h, w = image.shape[:2]
    ch, cw = int(h * keep), int(w * keep)
    y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
    return cv2.resize(image[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_CUBIC)


def illumination(image, rng):
    gamma = rng.uniform(0.4, 0.55) if rng.random() < 0.5 else rng.uniform(1.8, 2.4)
    out = 255.0 * (image / 255.0) ** gamma
    out = out * rng.uniform(0.8, 1.1, 3) + rng.uniform(-20, 20)  # colour cast and offset
    return np.clip(out, 0, 255).astype(np.uint8)


def occlusion(image, rng, boxes=4):
    out = image.copy()
    h, w = image.shape[:2]
    for _ in range(boxes):
        bh, bw = int(h * rng.uniform(0.2, 0.4)), int(w * rng.uniform(0.2, 0.4))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        out[y : y + bh, x : x + bw] = rng.integers(0, 255, 3)
    return out


def combined(image, rng):
    h, w = image.shape[:2]
    rotation = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-40, 40), rng.uniform(0.5, 0.65))
    rotated = cv2.warpAffine(image, rotation, (w, h), borderMode=cv2.BORDER_REFLECT)
    return illumination(rotated, rng)


VARIANTS = {"view": viewpoint, "zoom": zoom, "light": illumination, "occluded": occlusion, "mixed": combined}


def unseen(image, rng):
    """The held-out query of a place: another viewpoint, closer, in other light."""
    return illumination(zoom(viewpoint(image, rng, 0.15), rng, 0.7), rng)


def build(output, seed=0, places=PLACES, distractors=DISTRACTORS):
    """Write the corpus to `output`; returns [(file name, group or None)]."""
    folder = os.path.join(output, "images")
    os.makedirs(folder, exist_ok=True)
    rows = []

    def save(name, image, group):
        cv2.imwrite(os.path.join(folder, name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        rows.append((name, group))

    for i, place in enumerate(places):
        rng = np.random.default_rng(seed * 1000 + i)
        group = place.replace("_left", "").replace("immunohistochemistry", "ihc")
        base = load(place)
        save(f"{group}.jpg", base, group)
        for variant, change in VARIANTS.items():
            save(f"{group}-{variant}.jpg", change(base, rng), group)
        if place == "motorcycle_left":
            save(f"{group}-right.jpg", load("motorcycle_right"), group)
        query = unseen(base, np.random.default_rng(seed * 1000 + i + 500))
        os.makedirs(os.path.join(output, "queries"), exist_ok=True)
        cv2.imwrite(os.path.join(output, "queries", f"{group}.jpg"), cv2.cvtColor(query, cv2.COLOR_RGB2BGR))
    for name in distractors:
        save(f"distractor-{name}.jpg", load(name), None)
    with open(os.path.join(output, "groups.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "group"])
        writer.writerows((name, group or "") for name, group in rows)
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m delf_index.pipelines.demo_corpus OUTPUT_DIR", file=sys.stderr)
        return 2
    rows = build(argv[0])
    groups = {g for _, g in rows if g}
    print(
        f"demo corpus: {len(rows)} images, {len(groups)} places, {sum(g is None for _, g in rows)} distractors "
        f"-> {argv[0]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
