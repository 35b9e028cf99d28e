"""`delf-index train`: DELF's attention head (and optionally its descriptors) from image labels.

    delf-index train --manifest train.csv --output runs/head                     # attention only
    delf-index train --manifest gs://bucket/train.csv --output runs/ft --stage1-epochs 5
    delf-index train --manifest train.csv --output runs/head --resume            # continue a run
    delf-index export-model --attention runs/head/attention.pt --output head.onnx

DELF's recipe (Noh et al. 2017), on image-level landmark labels:

1. stage 1 (``--stage1-epochs``, off by default): fine-tune the descriptor layers (the
   backbone up to the local feature layer) with a classification loss on average-pooled
   local features;
2. stage 2: freeze the descriptors and train the attention head: the L2-normalised local
   features, weighted by the attention scores and averaged, feed a linear classifier.
   Training crops are randomly rescaled over the extractor's pyramid range, so that scores
   from different pyramid levels can be compared when the best features are selected.

Two optional objectives train the head as well (docs/training.md; benchmarks/README.md
has what they measured): ``matchability_weight``, label-free: each crop is also warped by a
random homography, and a cell is a positive when its mutual nearest neighbour in the other
view is the geometrically right cell; ``verified_weight``: cells that RANSAC verifies between
two images of the same landmark, over the whole pyramid, are the positives. Both rank
positives above negatives (pairwise logistic loss).

The manifest has Google-Landmarks-v2's ``train.csv`` shape: columns ``id``, ``landmark_id``
and ``url`` or ``path`` (relative paths resolve against the manifest's folder), on any
fsspec filesystem. Per class, ``val_fraction`` of the images are held out to report
validation accuracy after every epoch.

Written to ``--output``: ``attention.pt`` (the head, what `export-model --attention` reads),
``backbone.pt`` (after stage 1), ``checkpoint.pt`` (what ``--resume`` continues from),
``history.json`` (loss and accuracies per epoch), ``split.json`` and ``conf.json``.
"""

import argparse
import csv
import json
import logging
import math
import os
import posixpath
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from delf_index.errors import UserError
from delf_index.indexing import verify
from delf_index.model.backbones import DEFAULT_FEATURE_LAYER, EfficientNetLite, ResNet50
from delf_index.model.delf import DELF
from delf_index.model.weights import default_weights_path, read_state_dict
from delf_index.runtime import storage
from delf_index.runtime.images import read_image

logger = logging.getLogger("delf_index.train")

default_conf = {
    "backbone": "efficientnet_lite0",  # DELF backbone (model/backbones.py)
    "feature_layer": None,  # layer of the local features; None: the backbone's default (recorded resolved)
    "weights": None,  # backbone state dict to start from; None: the packaged ImageNet weights
    "image_size": 1024,  # images are first shrunk to this largest side, as the extractor does
    "crop_size": 256,  # side of the square training crops, a multiple of 32
    "scale_range": (0.25, 2.0),  # random rescaling, log-uniform: the extractor's pyramid range
    "crops_per_image": 4,  # samples drawn from each training image per epoch
    "batch_size": 8,
    "stage1_epochs": 0,  # descriptor fine-tuning; 0 keeps the backbone's descriptors (measured better here)
    "stage1_lr": 1e-4,  # Adam, cosine decay; the backbone moves slowly
    "epochs": 20,  # stage 2: attention
    "lr": 1e-3,  # Adam, cosine decay, for the attention head and the classifiers
    "weight_decay": 1e-4,
    "val_fraction": 0.2,  # images held out per class for the validation accuracy
    "val_size": 512,  # largest side of validation images (one pass, whole image)
    "classification_weight": 1.0,  # DELF's loss: attention-pooled features -> classifier
    "matchability_weight": 0.0,  # label-free loss on homography pairs; 0 disables it
    "homography": {  # random warps of the matchability pairs
        "max_rotation": 15.0,  # degrees
        "max_scale": 1.25,  # scale change, log-uniform in [1/x, x]
        "perspective": 0.08,  # corner displacement, fraction of the crop side
        "photometric": 0.2,  # brightness / contrast / gamma jitter of the second view
    },
    "match_radius": 16.0,  # pixels: a nearest neighbour this close to the true position is right
    "verified_weight": 0.0,  # real-pair loss: cells that RANSAC verifies between images of a class rank first
    "verified_pairs": 40,  # most image pairs per class that give the real-pair targets
    "verified_images": 8,  # images per step for the real-pair loss
    "verified_cells": 1024,  # cells drawn per image and step for it (all pyramid levels)
    "scales": (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0),  # pyramid of the real-pair targets (extractor's)
    "seed": 0,  # every random choice (split, order, crops, initialisation) derives from it
    "device": None,  # None: cuda when available, else cpu
    "amp": None,  # bf16 autocast; None: on for cuda
    "num_workers": 0,  # data loader processes (decoding and cropping)
    "threads": None,  # torch CPU threads; None: torch's default
    "checkpoint_every": 0,  # also checkpoint every N steps within an epoch (large data sets)
    "cache_images": True,  # keep decoded images in memory (small data sets)
}

# Knobs that may change when a run is resumed: they do not change what is computed.
RESUMABLE = {"epochs", "stage1_epochs", "device", "num_workers", "threads", "checkpoint_every", "cache_images"}


# -- data -------------------------------------------------------------------------------------
def read_manifest(uri):
    """Rows {id, location, landmark_id} of a GLDv2-style train.csv on any fsspec filesystem.

    The image location is the ``path`` column when present (relative paths resolve against
    the manifest's folder), else ``url``. Rows without a landmark id are skipped.
    """
    with storage.open_file(uri, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"{uri}: empty manifest")
    columns = set(rows[0])
    if not {"id", "landmark_id"} <= columns or not columns & {"path", "url"}:
        raise UserError(f"{uri}: a manifest needs columns id, landmark_id and url or path; got {sorted(columns)}")
    remote = "://" in uri
    base = posixpath.dirname(uri) if remote else os.path.dirname(os.path.abspath(uri))
    items = []
    for row in rows:
        if not (row.get("landmark_id") or "").strip():
            continue
        location = (row.get("path") or "").strip() or (row.get("url") or "").strip()
        if not location:
            raise UserError(f"{uri}: row {row['id']} has neither path nor url")
        if "://" not in location and not os.path.isabs(location):
            location = posixpath.join(base, location) if remote else os.path.join(base, location)
        items.append({"id": row["id"], "location": location, "landmark_id": row["landmark_id"].strip()})
    return items


def split_items(items, val_fraction, seed):
    """Class indices and a per-class train / validation split, seeded.

    Each class keeps at least one training image; a class of n images gives round(n *
    val_fraction) to validation. Returns (train, val, class names), items gaining ``label``.
    """
    classes = sorted({it["landmark_id"] for it in items}, key=lambda c: (len(c), c))
    index = {c: i for i, c in enumerate(classes)}
    rng = np.random.default_rng([seed, 1])
    by_class = {}
    for it in items:
        by_class.setdefault(it["landmark_id"], []).append({**it, "label": index[it["landmark_id"]]})
    train, val = [], []
    for c in classes:
        members = by_class[c]
        order = rng.permutation(len(members))
        n_val = min(int(math.floor(len(members) * val_fraction + 0.5)), len(members) - 1)
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return train, val, classes


def load_image(location, max_side):
    """uint8 RGB image shrunk (area interpolation) to `max_side` on its largest side."""
    image = read_image(location)
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        image = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return image


def cell_mask(pixel_valid, stride, offset):
    """Cells of a feature map whose receptive-field centre is a valid pixel, as the extractor
    keeps them: [H, W] bool pixels -> [H / stride, W / stride] bool cells."""
    return pixel_valid[offset::stride, offset::stride][
        : pixel_valid.shape[0] // stride, : pixel_valid.shape[1] // stride
    ]


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


def epoch_keys(n_items, crops_per_image, seed, stage, epoch):
    """The (index, seed) samples of one epoch, in order: a function of the seed alone."""
    rng = np.random.default_rng([seed, stage, epoch])
    indices = rng.permutation(np.repeat(np.arange(n_items), crops_per_image))
    seeds = rng.integers(0, 2**62, size=len(indices))
    return [(int(i), int(s)) for i, s in zip(indices, seeds)]


# -- network ----------------------------------------------------------------------------------
def local_features(backbone, x):
    """The local feature map only: training never needs the layers after it, which feed the
    global descriptor alone and cost about as much again."""
    if isinstance(backbone, EfficientNetLite):
        x = F.relu6(backbone._bn0(backbone._conv_stem(x)))
        for block in backbone._blocks[: backbone._local_block + 1]:
            x = block(x)
        if backbone.feature_layer == "stage6_expand":
            nxt = backbone._blocks[backbone._local_block + 1]
            x = F.relu6(nxt._bn0(nxt._expand_conv(x)))
        return x
    if isinstance(backbone, ResNet50):
        x = backbone.maxpool(F.relu(backbone.bn1(backbone.conv1(x))))
        return backbone.layer3(backbone.layer2(backbone.layer1(x)))
    return backbone(x)[0]


def masked_mean(x, mask):
    """Mean of [B, C, H, W] over the cells where mask [B, H, W] is true -> [B, C]."""
    m = mask[:, None].to(x.dtype)
    return (x * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp(min=1)


def attention_pool(features, scores, mask):
    """DELF's attention pooling: mean of L2-normalised features weighted by the scores."""
    return masked_mean(F.normalize(features, dim=1) * scores[:, None], mask)


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


class PyramidCells:
    """All candidate cells of an image over the extractor's pyramid: raw features (the head's
    input), original-pixel positions and scales, as `delf_index.runtime.extractor` computes them."""

    def __init__(self, trainer, image, scales, min_level_size=10):
        h0, w0 = image.shape[:2]
        m, stride, offset = trainer.net.input_multiple, trainer.stride, trainer.offset
        pad = np.array([int(round(v)) for v in trainer.net.mean.flatten().tolist()], np.uint8)
        feats, xs, ys, ss = [], [], [], []
        for s in scales:
            h, w = round(h0 * s), round(w0 * s)
            if min(h, w) < min_level_size:
                continue
            level = image if (h, w) == (h0, w0) else cv2.resize(image, (w, h), interpolation=_interpolation(s))
            padded = np.empty((-(-h // m) * m, -(-w // m) * m, 3), np.uint8)
            padded[:] = pad
            padded[:h, :w] = level
            valid = np.zeros(padded.shape[:2], bool)
            valid[:h, :w] = True
            rows, cols = np.nonzero(cell_mask(valid, stride, offset))
            f = trainer.features(torch.from_numpy(padded)[None], grad=False)[0]
            feats.append(f[:, torch.from_numpy(rows), torch.from_numpy(cols)].T.cpu().half())
            xs.append((cols * stride + offset + 0.5) * (w0 / w) - 0.5)
            ys.append((rows * stride + offset + 0.5) * (h0 / h) - 0.5)
            ss.append(np.full(len(rows), np.sqrt((h0 / h) * (w0 / w))))
        self.features = torch.cat(feats)  # [n, C] float16
        self.xy = np.stack([np.concatenate(xs), np.concatenate(ys)], 1)
        self.scale = np.concatenate(ss)
        self.size = (w0, h0)
        self.verified = np.zeros(len(self.features), bool)
        self.pairs = 0

    def descriptors(self):
        return F.normalize(self.features.float(), dim=1)


def _interpolation(scale):
    return cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR


def verified_targets(cells, labels, max_pairs, seed):
    """Mark, in each image's PyramidCells, the cells that are RANSAC inliers (scale-consistent
    affine, indexing.verify) of the mutual nearest-neighbour matches with another image of
    its class. Pairs per class are capped at `max_pairs` (a seeded sample). Returns the number
    of pairs verified and tried."""
    rng = np.random.default_rng([seed, 2])
    by_class = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    verified = tried = 0
    for members in by_class.values():
        pairs = [(a, b) for k, a in enumerate(members) for b in members[k + 1 :]]
        if len(pairs) > max_pairs:
            pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
        for a, b in pairs:
            ca, cb = cells[a], cells[b]
            matches = mutual_nearest(ca.descriptors(), cb.descriptors())
            tried += 1
            if len(matches) < 3:
                continue
            _, inliers = verify.ransac_affine(
                ca.xy[matches[:, 0]],
                cb.xy[matches[:, 1]],
                cb.size,
                {"max_trials": 10000},
                scales_a=ca.scale[matches[:, 0]],
                scales_b=cb.scale[matches[:, 1]],
            )
            if inliers.any():
                verified += 1
                ca.verified[matches[inliers, 0]] = True
                cb.verified[matches[inliers, 1]] = True
                ca.pairs += 1
                cb.pairs += 1
    return verified, tried


class Trainer:
    """The network, its classifiers and one optimiser per stage; see the module docstring."""

    def __init__(self, conf, num_classes, device):
        self.conf, self.device = conf, device
        torch.manual_seed(conf["seed"])
        self.net = DELF(conf["backbone"], conf["feature_layer"], attention=True)
        weights = conf["weights"] or default_weights_path(conf["backbone"])
        self.net.backbone.load_imagenet(read_state_dict(weights))
        channels = self.net.backbone.local_dim
        self.classifiers = nn.ModuleDict({"1": nn.Linear(channels, num_classes), "2": nn.Linear(channels, num_classes)})
        self.net.to(device)
        self.classifiers.to(device)
        geometry = self.net.geometry()
        self.stride, self.offset = int(geometry["stride"]), int(round(geometry["centre_offset"]))
        self.amp = device.type == "cuda" if conf["amp"] is None else bool(conf["amp"])

    def parameters(self, stage):
        if stage == 1:
            return list(self.net.backbone.parameters()) + list(self.classifiers["1"].parameters())
        return list(self.net.attention.parameters()) + list(self.classifiers["2"].parameters())

    def set_mode(self, stage, training):
        """BatchNorm statistics of the backbone stay frozen (small batches); the head's train."""
        self.net.eval()
        self.net.backbone.requires_grad_(stage == 1 and training)
        self.net.attention.requires_grad_(stage == 2 and training)
        if training and stage == 2:
            self.net.attention.train()
        self.classifiers.train(training)

    def features(self, images, grad):
        x = self.net.normalise(images.to(self.device, non_blocking=True))
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(grad), torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            return local_features(self.net.backbone, x).float()

    def losses(self, stage, batch, training):
        """Loss terms and correct-prediction count of one batch."""
        conf = self.conf
        images, masks, labels = batch["image"], batch["mask"].to(self.device), batch["label"].to(self.device)
        pairs = stage == 2 and "image_b" in batch
        if stage == 2 and conf["classification_weight"] == 0 and not (pairs and conf["matchability_weight"] > 0):
            return {}, 0, 0  # only the real-pair loss: no crop to run
        if pairs:  # both views are classified; the second also gives matchability targets
            images = torch.cat([images, batch["image_b"]])
            masks = torch.cat([masks, batch["mask_b"].to(self.device)])
            labels = torch.cat([labels, labels])
        feats = self.features(images, grad=stage == 1 and training)
        out = {}
        if stage == 1:
            logits = self.classifiers["1"](masked_mean(feats, masks))
            out["classification"] = F.cross_entropy(logits, labels)
        else:
            raw = self.net.attention.logits(feats)
            pooled = attention_pool(feats, F.softplus(raw), masks)
            logits = self.classifiers["2"](pooled)
            if conf["classification_weight"] > 0:
                out["classification"] = conf["classification_weight"] * F.cross_entropy(logits, labels)
            if pairs and conf["matchability_weight"] > 0:
                out["matchability"] = conf["matchability_weight"] * self.matchability_loss(feats, raw, masks, batch)
        correct = int((logits.argmax(1) == labels).sum())
        return out, correct, len(labels)

    def matchability_loss(self, feats, raw, masks, batch):
        """Pairwise ranking loss: every matchable cell of the batch should score above every
        unmatchable one, softplus(logit_neg - logit_pos) averaged over the pairs.

        A ranking loss constrains only the order of the scores, which is what selection uses;
        binary cross-entropy on the logits would also pin their scale and offset, against
        the classification loss (measured: both losses then got worse). Pairs span all crops
        of the batch, hence several scales, so that scores compare across pyramid levels.
        """
        n = len(batch["image"])
        targets = []
        for i in range(n):
            ta, tb = matchability_labels(
                feats[i].detach(),
                feats[n + i].detach(),
                masks[i],
                masks[n + i],
                batch["homography"][i],
                self.stride,
                self.offset,
                self.conf["match_radius"],
            )
            targets += [ta, tb]
        order = [j for i in range(n) for j in (i, n + i)]
        target = torch.stack(targets).to(raw.device).reshape(-1)
        logit = raw[order].reshape(-1)
        pos, neg = logit[target == 1], logit[target == 0]
        if not len(pos) or not len(neg):
            return raw.sum() * 0
        return F.softplus(neg[None, :] - pos[:, None]).mean()

    def verified_loss(self, cells, rng):
        """Ranking loss on real pairs: within each of `verified_images` images, its verified
        cells should score above its other cells (all pyramid levels compete, as in the
        extractor's selection). Cells are drawn uniformly, so that the head's BatchNorm sees
        the natural mix of cells."""
        usable = [c for c in cells if c.pairs and c.verified.any()]
        if not usable:
            return None
        chosen = rng.choice(len(usable), min(self.conf["verified_images"], len(usable)), replace=False)
        feats, targets = [], []
        for i in chosen:
            c = usable[i]
            take = rng.choice(len(c.features), min(self.conf["verified_cells"], len(c.features)), replace=False)
            feats.append(c.features[torch.from_numpy(take)])
            targets.append(torch.from_numpy(c.verified[take]))
        feats = torch.cat(feats).float().to(self.device)
        logits = self.net.attention.logits(feats.T[None, :, :, None])[0, :, 0]
        losses, start = [], 0
        for t in targets:
            part, start = logits[start : start + len(t)], start + len(t)
            t = t.to(self.device)
            pos, neg = part[t], part[~t]
            if len(pos) and len(neg):
                losses.append(F.softplus(neg[None, :] - pos[:, None]).mean())
        return torch.stack(losses).mean() if losses else None

    @torch.no_grad()
    def validate(self, stage, dataset):
        """Accuracy and mean loss on whole validation images at `val_size`, one at a time."""
        if not len(dataset.items):
            return None, None
        self.set_mode(stage, training=False)
        correct, total = 0, 0.0
        m = self.net.input_multiple
        for index, item in enumerate(dataset.items):
            image = dataset.image(index)
            f = self.conf["val_size"] / max(image.shape[:2])
            if f < 1:
                size = (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f)))
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            h, w = image.shape[:2]
            padded = np.empty((-(-h // m) * m, -(-w // m) * m, 3), np.uint8)
            padded[:] = dataset.pad_value
            padded[:h, :w] = image
            valid = np.zeros(padded.shape[:2], bool)
            valid[:h, :w] = True
            mask = torch.from_numpy(cell_mask(valid, self.stride, self.offset))[None].to(self.device)
            feats = self.features(torch.from_numpy(padded)[None], grad=False)
            if stage == 1:
                logits = self.classifiers["1"](masked_mean(feats, mask))
            else:
                logits = self.classifiers["2"](attention_pool(feats, self.net.attention(feats), mask))
            label = torch.tensor([item["label"]], device=self.device)
            total += float(F.cross_entropy(logits, label))
            correct += int(logits.argmax(1).item() == item["label"])
        return correct / len(dataset.items), total / len(dataset.items)


# -- checkpoints and progress -----------------------------------------------------------------
def _save(obj, path):
    """torch.save through a temporary file: a run killed mid-write keeps its last checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


class Progress:
    """A progress bar on a terminal, a line every `every` seconds in a log file."""

    def __init__(self, total, desc, every=30.0, stream=None):
        self.total, self.desc, self.every = total, desc, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, done, **info):
        self.done = done
        now = time.perf_counter()
        if done < self.total and now - self.last < (0.2 if self.tty else self.every):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0
        bar = "#" * int(20 * done / max(self.total, 1))
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        line = f"{self.desc} [{bar:<20}] {done}/{self.total} {text} {rate:.2f} it/s eta {eta:.0f}s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _cosine(base, step, total):
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


# -- training ---------------------------------------------------------------------------------
def train(manifest, output, conf=None, resume=False):
    """Train as the module docstring says; returns the per-epoch history (also history.json)."""
    unknown = set(conf or {}) - set(default_conf)
    if unknown:
        raise UserError(f"unknown training options {sorted(unknown)}; known: {sorted(default_conf)}")
    conf = {**default_conf, **(conf or {})}
    conf["homography"] = {**default_conf["homography"], **conf["homography"]}
    conf["scale_range"] = tuple(conf["scale_range"])
    # recorded resolved: the head fits this layer only, whatever the default becomes
    conf["feature_layer"] = conf["feature_layer"] or DEFAULT_FEATURE_LAYER[conf["backbone"]]
    if conf["epochs"] and not any(
        conf[k] > 0 for k in ("classification_weight", "matchability_weight", "verified_weight")
    ):
        raise UserError("no training objective: set classification_weight, matchability_weight or verified_weight")
    if conf["crop_size"] % 32:
        raise UserError(f"crop_size must be a multiple of 32, got {conf['crop_size']}")
    if conf["threads"]:
        torch.set_num_threads(int(conf["threads"]))
    device = torch.device(conf["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(output, exist_ok=True)
    ckpt_path = os.path.join(output, "checkpoint.pt")

    state = None
    if resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        changed = sorted(k for k in conf if k not in RESUMABLE and state["conf"].get(k) != conf[k])
        if changed:
            raise UserError(f"cannot resume {output}: options differ from the run's ({', '.join(changed)})")
        logger.info("resuming %s at stage %d, epoch %d, step %d", output, state["stage"], state["epoch"], state["step"])
    elif resume:
        logger.info("no checkpoint in %s: starting afresh", output)

    items = read_manifest(manifest)
    train_items, val_items, classes = split_items(items, conf["val_fraction"], conf["seed"])
    logger.info(
        "%d images, %d classes: %d for training, %d for validation",
        len(items),
        len(classes),
        len(train_items),
        len(val_items),
    )
    split = {"classes": classes, "train": [it["id"] for it in train_items], "val": [it["id"] for it in val_items]}
    _write_json(split, os.path.join(output, "split.json"))
    _write_json({**conf, "manifest": manifest}, os.path.join(output, "conf.json"))

    trainer = Trainer(conf, len(classes), device)
    pad = [int(round(v)) for v in trainer.net.mean.flatten().tolist()]
    pairs = conf["matchability_weight"] > 0
    train_set = CropDataset(train_items, conf, trainer.stride, trainer.offset, pad, pairs=pairs)
    val_set = CropDataset(val_items, conf, trainer.stride, trainer.offset, pad)
    history = state["history"] if state else []
    if state:
        trainer.net.load_state_dict(state["model"])
        trainer.classifiers.load_state_dict(state["classifiers"])

    for stage in (1, 2):
        epochs = conf["stage1_epochs"] if stage == 1 else conf["epochs"]
        if epochs == 0 or (state and state["stage"] > stage):
            continue
        params = trainer.parameters(stage)
        base_lr = conf["stage1_lr"] if stage == 1 else conf["lr"]
        optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=conf["weight_decay"])
        start_epoch = start_step = 0
        if state and state["stage"] == stage:
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, start_step = state["epoch"], state["step"]
        batch = conf["batch_size"]
        steps_per_epoch = -(-len(train_items) * conf["crops_per_image"] // batch)
        cells = None
        if stage == 2 and conf["verified_weight"] > 0:
            cells = real_pair_targets(trainer, train_set, conf)
        for epoch in range(start_epoch, epochs):
            keys = epoch_keys(len(train_items), conf["crops_per_image"], conf["seed"], stage, epoch)
            loader = torch.utils.data.DataLoader(
                train_set,
                batch_size=batch,
                sampler=keys[start_step * batch :],
                num_workers=conf["num_workers"],
                pin_memory=device.type == "cuda",
                persistent_workers=False,
            )
            trainer.set_mode(stage, training=True)
            progress = Progress(steps_per_epoch, f"stage {stage} epoch {epoch + 1}/{epochs}")
            sums, correct, seen, samples, start = {}, 0, 0, 0, time.perf_counter()
            step = start_step
            for data in loader:
                for group in optimizer.param_groups:
                    group["lr"] = _cosine(base_lr, epoch * steps_per_epoch + step, epochs * steps_per_epoch)
                losses, c, n = trainer.losses(stage, data, training=True)
                if cells is not None:
                    term = trainer.verified_loss(cells, np.random.default_rng([conf["seed"], 3, epoch, step]))
                    if term is not None:
                        losses["verified"] = conf["verified_weight"] * term
                step += 1
                if losses:  # else nothing to learn from in this batch
                    loss = sum(losses.values())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                correct, seen, samples = correct + c, seen + n, samples + len(data["label"])
                progress.update(step, loss=sums.get("loss", 0.0) / (step - start_step), acc=correct / max(seen, 1))
                if conf["checkpoint_every"] and step % conf["checkpoint_every"] == 0 and step < steps_per_epoch:
                    _save(_checkpoint(trainer, optimizer, conf, stage, epoch, step, history), ckpt_path)
            seconds = time.perf_counter() - start
            val_acc, val_loss = trainer.validate(stage, val_set)
            done = step - start_step
            record = {
                "stage": stage,
                "epoch": epoch + 1,
                **{k: v / max(done, 1) for k, v in sums.items()},
                "train_acc": correct / max(seen, 1),
                "val_acc": val_acc,
                "val_loss": val_loss,
                "seconds": round(seconds, 2),
                "samples_per_s": round(samples / max(seconds, 1e-9), 2),
            }
            history.append(record)
            logger.info("%s", json.dumps(record))
            start_step = 0
            _save(_checkpoint(trainer, optimizer, conf, stage, epoch + 1, 0, history), ckpt_path)
            _write_json(history, os.path.join(output, "history.json"))
        if stage == 1:
            _save(
                {k: v.cpu() for k, v in trainer.net.backbone.state_dict().items()}, os.path.join(output, "backbone.pt")
            )
        state = None  # the next stage starts afresh
    if conf["epochs"]:
        head = {k: v.cpu() for k, v in trainer.net.attention.state_dict().items()}
        _save(head, os.path.join(output, "attention.pt"))
    _write_json(history, os.path.join(output, "history.json"))
    return history


def real_pair_targets(trainer, dataset, conf):
    """PyramidCells of every training image with their verified cells marked (see
    `verified_targets`); logs how many pairs and cells were verified."""
    start = time.perf_counter()
    trainer.set_mode(2, training=False)
    progress = Progress(len(dataset.items), "pyramid cells of the training images")
    cells = []
    with torch.no_grad():
        for index in range(len(dataset.items)):
            cells.append(PyramidCells(trainer, dataset.image(index), conf["scales"]))
            progress.update(index + 1)
    labels = [it["label"] for it in dataset.items]
    verified, tried = verified_targets(cells, labels, conf["verified_pairs"], conf["seed"])
    positives = sum(int(c.verified.sum()) for c in cells)
    total = sum(len(c.verified) for c in cells)
    share = 100 * positives / max(total, 1)
    seconds = time.perf_counter() - start
    logger.info(
        "real-pair targets: %d of %d pairs verified, %.2f%% of %d cells, %.0fs", verified, tried, share, total, seconds
    )
    return cells


def _checkpoint(trainer, optimizer, conf, stage, epoch, step, history):
    """Everything a resumed run needs: weights, optimiser, position, history (tensors and
    plain Python values only, so that torch.load(weights_only=True) reads it)."""
    return {
        "stage": stage,
        "epoch": epoch,
        "step": step,
        "model": {k: v.cpu() for k, v in trainer.net.state_dict().items()},
        "classifiers": {k: v.cpu() for k, v in trainer.classifiers.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "conf": conf,
        "history": history,
    }


def _parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="delf-index train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="train.csv (id, url or path, landmark_id); any fsspec URI")
    parser.add_argument("--output", required=True, help="folder for attention.pt, checkpoints and history")
    parser.add_argument("--resume", action="store_true", help="continue from --output/checkpoint.pt if present")
    parser.add_argument("--epochs", type=int, help=f"attention epochs (default {default_conf['epochs']})")
    parser.add_argument("--stage1-epochs", type=int, help="descriptor fine-tuning epochs first (default 0)")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--backbone", help=f"default {default_conf['backbone']}")
    parser.add_argument("--weights", help="backbone state dict; packaged ImageNet weights if omitted")
    parser.add_argument("--conf", nargs="*", default=[], metavar="KEY=VALUE", help="any other option (JSON values)")
    args = parser.parse_args(argv)
    conf = {}
    for item in args.conf:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--conf takes KEY=VALUE, got {item!r}")
        conf[key] = _parse_value(value)
    for key in ("epochs", "stage1_epochs", "seed", "device", "backbone", "weights"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
    history = train(args.manifest, args.output, conf, resume=args.resume)
    last = {}
    for record in history:
        last[record["stage"]] = record
    for stage, record in sorted(last.items()):
        val = "n/a" if record["val_acc"] is None else f"{record['val_acc']:.3f}"
        loss = record.get("loss", float("nan"))
        print(f"stage {stage}: {record['epoch']} epochs, loss {loss:.4f}, validation accuracy {val}")
    print(f"wrote {os.path.join(args.output, 'attention.pt')}")
    return 0
