"""What the frozen backbone computes for training images, once: every cell of every pyramid
level (its raw local feature, the attention head's input, and where it sits in the image), and
which cells RANSAC verifies between two images of one place (the real-pair targets).

Stage 2 of `delf-index train` trains only the attention head, so the backbone's output per
image never changes during a run: computed once and kept on disk (``cache_dir``, keyed by the
backbone's weights, the pyramid and the image), it serves every epoch and every later run
with the same backbone. The matched pairs are cached likewise.
"""

import hashlib
import json
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from delf_index.indexing import verify


class PyramidCells:
    """All candidate cells of an image over the extractor's pyramid: raw features [n, C]
    float16, original-pixel positions `xy` [n, 2], `scale` [n] and pyramid `level` [n] (index
    into the scales), as `delf_index.runtime.extractor` computes them; `verified` marks the
    cells that some verified pair holds as inliers."""

    def __init__(self, features, xy, scale, level, size):
        self.features, self.xy, self.scale, self.level, self.size = features, xy, scale, level, tuple(size)
        self.verified = np.zeros(len(features), bool)
        self.pairs = 0

    @classmethod
    def compute(cls, trainer, image, scales, min_level_size=10):
        """The cells of a uint8 RGB image under `trainer`'s network (no gradients)."""
        h0, w0 = image.shape[:2]
        m, stride, offset = trainer.net.input_multiple, trainer.stride, trainer.offset
        pad = np.array([int(round(v)) for v in trainer.net.mean.flatten().tolist()], np.uint8)
        feats, xs, ys, ss, ls = [], [], [], [], []
        for n, s in enumerate(scales):
            h, w = round(h0 * s), round(w0 * s)
            if min(h, w) < min_level_size:
                continue
            interpolation = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
            level = image if (h, w) == (h0, w0) else cv2.resize(image, (w, h), interpolation=interpolation)
            padded = np.empty((-(-h // m) * m, -(-w // m) * m, 3), np.uint8)
            padded[:] = pad
            padded[:h, :w] = level
            valid = np.zeros(padded.shape[:2], bool)
            valid[:h, :w] = True
            rows, cols = np.nonzero(cell_mask(valid, stride, offset))
            with torch.no_grad():
                f = trainer.features(torch.from_numpy(padded)[None], grad=False)[0]
            feats.append(f[:, torch.from_numpy(rows), torch.from_numpy(cols)].T.cpu().half())
            xs.append((cols * stride + offset + 0.5) * (w0 / w) - 0.5)
            ys.append((rows * stride + offset + 0.5) * (h0 / h) - 0.5)
            ss.append(np.full(len(rows), np.sqrt((h0 / h) * (w0 / w))))
            ls.append(np.full(len(rows), n, np.int8))
        xy = np.stack([np.concatenate(xs), np.concatenate(ys)], 1)
        return cls(torch.cat(feats), xy, np.concatenate(ss), np.concatenate(ls), (w0, h0))

    def descriptors(self):
        return F.normalize(self.features.float(), dim=1)

    def save(self, path):
        tmp = path + ".tmp.npz"
        np.savez(tmp, features=self.features.numpy(), xy=self.xy, scale=self.scale, level=self.level,
                 size=np.array(self.size))  # fmt: skip
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        with np.load(path) as d:
            return cls(torch.from_numpy(d["features"]), d["xy"], d["scale"], d["level"], d["size"].tolist())


def cell_mask(pixel_valid, stride, offset):
    """Cells of a feature map whose receptive-field centre is a valid pixel, as the extractor
    keeps them: [H, W] bool pixels -> [H / stride, W / stride] bool cells."""
    return pixel_valid[offset::stride, offset::stride][
        : pixel_valid.shape[0] // stride, : pixel_valid.shape[1] // stride
    ]


def network_key(net):
    """A digest of the backbone's weights: cached cells are valid for this backbone only."""
    digest = hashlib.sha1()
    for name, tensor in sorted(net.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def image_cells(trainer, items, load, scales, cache_dir=None, progress=None):
    """PyramidCells of each item (`load(index)` gives its image), read from `cache_dir` when
    computed before with the same backbone, pyramid and image, else computed (and saved)."""
    base = json.dumps([network_key(trainer.net), list(scales), trainer.conf["image_size"]])
    out = []
    for index, item in enumerate(items):
        path = None
        if cache_dir:
            key = hashlib.sha1(f"{base}|{item['location']}".encode()).hexdigest()[:24]
            path = os.path.join(cache_dir, "cells", f"{key}.npz")
        if path and os.path.exists(path):
            out.append(PyramidCells.load(path))
        else:
            out.append(PyramidCells.compute(trainer, load(index), scales))
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                out[-1].save(path)
        if progress:
            progress.update(index + 1)
    return out


def mutual_nearest(desc_a, desc_b, ratio=0.95, chunk=4096):
    """Mutual nearest neighbours (cosine) of two large descriptor sets that pass a ratio test,
    [M, 2] indices; computed in chunks, so that 25k x 25k cells fit in memory."""
    n, m = len(desc_a), len(desc_b)
    best_ab = torch.empty(n, dtype=torch.long)
    keep = torch.empty(n, dtype=torch.bool)
    best_ba = torch.full((m,), -1, dtype=torch.long)
    best_ba_sim = torch.full((m,), -2.0)
    for i in range(0, n, chunk):
        sim = desc_a[i : i + chunk] @ desc_b.T
        top, idx = sim.topk(2, dim=1)
        best_ab[i : i + chunk] = idx[:, 0]
        # distances of unit vectors: d^2 = 2 - 2 cos
        d1, d2 = (2 - 2 * top[:, 0]).clamp(min=0).sqrt(), (2 - 2 * top[:, 1]).clamp(min=0).sqrt()
        keep[i : i + chunk] = d1 <= ratio * d2
        col, row = sim.max(dim=0)
        better = col > best_ba_sim
        best_ba_sim[better], best_ba[better] = col[better], row[better] + i
    a = torch.nonzero(keep & (best_ba[best_ab] == torch.arange(n))).squeeze(1)
    return torch.stack([a, best_ab[a]], 1).numpy()


def class_pairs(labels, max_pairs, seed):
    """Pairs (a, b), a < b, of items with the same label, at most `max_pairs` per label (a
    seeded sample)."""
    rng = np.random.default_rng([seed, 2])
    by_class = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    out = []
    for members in by_class.values():
        pairs = [(a, b) for k, a in enumerate(members) for b in members[k + 1 :]]
        if len(pairs) > max_pairs:
            pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
        out += pairs
    return out


def verified_inliers(ca, cb):
    """Cell indices [K, 2] of the RANSAC inliers (scale-consistent affine, indexing.verify)
    among the mutual nearest neighbours of two images' cells; empty when the pair does not
    verify."""
    matches = mutual_nearest(ca.descriptors(), cb.descriptors())
    if len(matches) < 3:
        return np.zeros((0, 2), np.int64)
    _, inliers = verify.ransac_affine(
        ca.xy[matches[:, 0]],
        cb.xy[matches[:, 1]],
        cb.size,
        {"max_trials": 10000},
        scales_a=ca.scale[matches[:, 0]],
        scales_b=cb.scale[matches[:, 1]],
    )
    return matches[inliers]


def verified_targets(cells, pairs, cache=None, progress=None):
    """Mark, in each image's PyramidCells, the cells that are inliers of a verified pair among
    `pairs` [(a, b)]; `cache`: an .npz path keeping each pair's inliers (the matching is what
    takes the time). Returns the number of pairs verified and tried."""
    found = {}
    if cache and os.path.exists(cache):
        with np.load(cache) as d:
            found = {(int(a), int(b)): d[f"{a}_{b}"] for a, b in d["pairs"]}
    verified = 0
    for n, (a, b) in enumerate(pairs):
        if (a, b) not in found:
            found[(a, b)] = verified_inliers(cells[a], cells[b])
        inliers = found[(a, b)]
        if len(inliers):
            verified += 1
            cells[a].verified[inliers[:, 0]] = True
            cells[b].verified[inliers[:, 1]] = True
            cells[a].pairs += 1
            cells[b].pairs += 1
        if progress:
            progress.update(n + 1, verified=verified)
    if cache:
        tmp = cache + ".tmp.npz"
        inliers = {f"{a}_{b}": v for (a, b), v in found.items()}
        np.savez(tmp, pairs=np.array(list(found), np.int64).reshape(-1, 2), **inliers)
        os.replace(tmp, cache)
    return verified, len(pairs)
