"""Random training views for `delf-index train`: rescaled crops of labelled images, and for
the label-free matchability objective, a second view of each crop under a random homography
with the cells each view can verify in the other."""

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from delf_index.model.cells import cell_mask
from delf_index.runtime.images import read_image


def load_image(location, max_side):
    """uint8 RGB image shrunk (area interpolation) to `max_side` on its largest side."""
    image = read_image(location)
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        image = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return image


def random_crop(image, rng, crop, scale_range, pad_value):
    """A `crop` x `crop` view of `image` rescaled by a log-uniform random factor.

    Returns (crop uint8 [crop, crop, 3], valid pixels [crop, crop] bool, the scaled image it
    was cut from, 3x3 map scaled image -> crop). Rescaled images smaller than the crop are
    padded bottom/right with the mean colour, as the extractor pads pyramid levels.
    """
    lo, hi = scale_range
    s = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    h, w = image.shape[:2]
    sh, sw = max(1, round(h * s)), max(1, round(w * s))
    # shrink with area interpolation (anti-aliased, as the pyramid); enlarge bilinearly
    scaled = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    ch, cw = min(crop, sh), min(crop, sw)
    y0, x0 = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    out = np.empty((crop, crop, 3), np.uint8)
    out[:] = pad_value
    out[:ch, :cw] = scaled[y0 : y0 + ch, x0 : x0 + cw]
    valid = np.zeros((crop, crop), bool)
    valid[:ch, :cw] = True
    to_crop = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64)
    return out, valid, scaled, to_crop


def random_homography(rng, size, conf):
    """3x3 map of a `size` square to a randomly rotated, scaled and perspective-warped one."""
    c = (size - 1) / 2
    corners = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], np.float64)
    theta = math.radians(rng.uniform(-1, 1) * conf["max_rotation"])
    s = math.exp(rng.uniform(-1, 1) * math.log(conf["max_scale"]))
    rot = s * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    moved = (corners - c) @ rot.T + c + rng.uniform(-1, 1, (4, 2)) * conf["perspective"] * size
    return cv2.getPerspectiveTransform(corners.astype(np.float32), moved.astype(np.float32)).astype(np.float64)


def photometric(image, rng, strength):
    """Brightness, contrast and gamma jitter: the second view is not the same photograph."""
    x = image.astype(np.float32) / 255.0
    x = x ** math.exp(rng.uniform(-1, 1) * strength * 2)
    x = (x - 0.5) * (1 + rng.uniform(-1, 1) * strength) + 0.5 + rng.uniform(-1, 1) * strength / 2
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


class CropDataset(torch.utils.data.Dataset):
    """Random training views of labelled images; an item is addressed by (index, seed), so that
    an epoch's samples depend on the seed alone, whatever the loader's workers do."""

    def __init__(self, items, conf, stride, offset, pad_value, pairs=False):
        self.items, self.conf, self.pairs = items, conf, pairs
        self.stride, self.offset, self.pad_value = stride, offset, np.asarray(pad_value, np.uint8)
        self.cache = {}

    def __len__(self):
        return len(self.items)

    def image(self, index):
        if index in self.cache:
            return self.cache[index]
        image = load_image(self.items[index]["location"], self.conf["image_size"])
        if self.conf["cache_images"]:
            self.cache[index] = image
        return image

    def __getitem__(self, key):
        index, seed = key
        rng = np.random.default_rng(seed)
        conf = self.conf
        crop, valid, scaled, to_crop = random_crop(
            self.image(index), rng, conf["crop_size"], conf["scale_range"], self.pad_value
        )
        out = {
            "image": torch.from_numpy(crop),
            "mask": torch.from_numpy(cell_mask(valid, self.stride, self.offset)),
            "label": self.items[index]["label"],
        }
        if self.pairs:
            size = conf["crop_size"]
            hom = random_homography(rng, size, conf["homography"])
            warp = hom @ to_crop  # scaled image -> second view
            view = cv2.warpPerspective(
                scaled, warp, (size, size), flags=cv2.INTER_LINEAR, borderValue=tuple(int(v) for v in self.pad_value)
            )
            inside = np.zeros(scaled.shape[:2], np.uint8)
            inside[:] = 1
            inside = cv2.warpPerspective(inside, warp, (size, size), flags=cv2.INTER_NEAREST) > 0
            # the second view shows only what the first one does: the rest is unverifiable
            shown = cv2.warpPerspective(valid.astype(np.uint8), hom, (size, size), flags=cv2.INTER_NEAREST) > 0
            out["image_b"] = torch.from_numpy(photometric(view, rng, conf["homography"]["photometric"]))
            out["mask_b"] = torch.from_numpy(cell_mask(inside & shown, self.stride, self.offset))
            out["homography"] = torch.from_numpy(hom)
        return out


def matchability_labels(feat_a, feat_b, mask_a, mask_b, hom, stride, offset, radius):
    """Targets of the label-free objective for the cells of two views of one crop.

    feat_* [C, h, w], mask_* [h, w], hom: 3x3 map from view a to view b pixels. A cell's
    target is 1 when its mutual nearest neighbour (cosine) among the other view's cells lies
    within `radius` pixels of where the homography sends it, 0 when not, and -1 (ignored)
    when its true position is not a valid cell of the other view. Returns (targets of a,
    targets of b), each [h * w].
    """
    c, h, w = feat_a.shape
    device = feat_a.device
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    centres = torch.stack([xs, ys], -1).reshape(-1, 2).double() * stride + offset
    da = F.normalize(feat_a.reshape(c, -1).T.float(), dim=1)
    db = F.normalize(feat_b.reshape(c, -1).T.float(), dim=1)
    va, vb = mask_a.reshape(-1).to(device), mask_b.reshape(-1).to(device)
    sim = (da @ db.T).masked_fill(~va[:, None] | ~vb[None, :], -2.0)
    ab, ba = sim.argmax(1), sim.argmax(0)
    hom = hom.to(device=device, dtype=torch.float64)

    def targets(nn_fwd, nn_bwd, valid_src, valid_dst, mapping):
        pts = torch.cat([centres, torch.ones_like(centres[:, :1])], 1) @ mapping.T
        pts = pts[:, :2] / pts[:, 2:].clamp(min=1e-9)
        cell = torch.round((pts - offset) / stride).long()
        inside = (cell[:, 0] >= 0) & (cell[:, 0] < w) & (cell[:, 1] >= 0) & (cell[:, 1] < h)
        flat = cell[:, 1].clamp(0, h - 1) * w + cell[:, 0].clamp(0, w - 1)
        seen = valid_src & inside & valid_dst[flat]
        mutual = nn_bwd[nn_fwd] == torch.arange(len(nn_fwd), device=device)
        right = mutual & ((centres[nn_fwd] - pts).norm(dim=1) <= radius)
        return torch.where(seen, right.float(), torch.full_like(pts[:, 0], -1.0).float())

    return targets(ab, ba, va, vb, hom), targets(ba, ab, vb, va, torch.linalg.inv(hom))
