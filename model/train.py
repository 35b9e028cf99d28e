"""`delf-index train`: DELF's attention head (and optionally its descriptors) from image labels,
or from the verified pairs of a collection's own match graph.

    delf-index train --manifest train.csv --output runs/head                     # attention only
    delf-index train --manifest gs://bucket/train.csv --output runs/ft --stage1-epochs 5
    delf-index train --manifest train.csv --output runs/head --resume            # continue a run
    delf-index train --from-match gs://bucket/match --output runs/own            # no labels
    delf-index export-model --attention runs/head/attention.pt --output head.onnx

DELF's recipe (Noh et al. 2017), on image-level landmark labels:

1. stage 1 (``--stage1-epochs``, off by default): fine-tune the descriptor layers (the
   backbone up to the local feature layer) with a classification loss on average-pooled
   local features of random crops;
2. stage 2: freeze the descriptors and train the attention head: the L2-normalised local
   features, weighted by the attention scores and averaged, feed a linear classifier. The
   frozen backbone's cells of every pyramid level of every image are computed once and
   cached (model/cells.py), and each sample is one level of one image: random rescaling over
   the extractor's pyramid, so that scores from different levels can be compared when the
   best features are selected. ``inputs="crops"`` runs the backbone on random rescaled
   crops every step instead (needed by the matchability objective).

Two further objectives train the head as well (docs/training.md; benchmarks/README.md has
what they measured): ``verified_weight``: cells that RANSAC verifies between two images of the
same landmark (or, with ``--from-match``, of a verified pair of the match graph), over the
whole pyramid, are the positives; ``matchability_weight``, label-free: each crop is also warped
by a random homography, and a cell is a positive when its mutual nearest neighbour in the
other view is the geometrically right cell. Both rank positives above negatives (pairwise
logistic loss). ``norm_weight`` makes the head a learned correction of the L2-norm ranking.

The manifest has Google-Landmarks-v2's ``train.csv`` shape: columns ``id``, ``landmark_id``
and ``url`` or ``path`` (relative paths resolve against the manifest's folder), on any
fsspec filesystem. Per class, ``val_fraction`` of the images are held out for the validation
figures reported after every epoch.

Written to ``--output``: ``attention.pt`` (the head, what `export-model --attention` reads),
``backbone.pt`` (after stage 1), ``checkpoint.pt`` (what ``--resume`` continues from),
``history.json`` (loss and validation figures per epoch), ``split.json`` and ``conf.json``.
"""

import argparse
import csv
import hashlib
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
from delf_index.indexing import artifact
from delf_index.model import cells as cells_lib
from delf_index.model.backbones import DEFAULT_FEATURE_LAYER, EfficientNetLite, ResNet50
from delf_index.model.cells import cell_mask
from delf_index.model.crops import CropDataset, matchability_labels
from delf_index.model.delf import DELF
from delf_index.model.weights import default_weights_path, read_state_dict
from delf_index.runtime import storage
from delf_index.runtime.conf import resolve_conf

logger = logging.getLogger("delf_index.train")

default_conf = {
    "backbone": "efficientnet_lite0",  # DELF backbone (model/backbones.py)
    "feature_layer": None,  # layer of the local features; None: the backbone's default (recorded resolved)
    "weights": None,  # backbone state dict to start from; None: the packaged ImageNet weights
    "image_size": 1024,  # images are first shrunk to this largest side, as the extractor does
    "inputs": "cells",  # stage 2 learns from the cached pyramid cells, or "crops": the backbone on random crops
    "cache_dir": None,  # where cells and matched pairs are kept across runs; None: <output>/cache
    "norm_weight": None,  # None: DELF's head; a number: the head corrects log(L2 norm) x this (learned) weight
    "crop_size": 256,  # side of the square training crops, a multiple of 32
    "scale_range": (0.25, 2.0),  # random rescaling of crops, log-uniform: the extractor's pyramid range
    "crops_per_image": 4,  # samples (crops, or pyramid levels) drawn from each training image per epoch
    "batch_size": 8,
    "stage1_epochs": 0,  # descriptor fine-tuning; 0 keeps the backbone's descriptors (measured better here)
    "stage1_lr": 1e-4,  # Adam, cosine decay; the backbone moves slowly
    "epochs": 20,  # stage 2: attention
    "lr": 1e-3,  # Adam, cosine decay, for the attention head and the classifiers
    "weight_decay": 1e-4,
    "val_fraction": 0.2,  # images held out per class for the validation figures
    "val_size": 512,  # largest side of validation images (stage 1 and crops: one pass, whole image)
    "val_features": 500,  # validation: the share of verified cells among an image's best this many
    "classification_weight": 1.0,  # DELF's loss: attention-pooled features -> classifier
    "matchability_weight": 0.0,  # label-free loss on homography pairs; 0 disables it (needs inputs "crops")
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
    "scales": (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0),  # pyramid of the cells (the extractor's)
    "seed": 0,  # every random choice (split, order, crops, initialisation) derives from it
    "device": None,  # None: cuda when available, else cpu
    "amp": None,  # bf16 autocast; None: on for cuda
    "num_workers": 0,  # data loader processes (decoding and cropping)
    "threads": None,  # torch CPU threads; None: torch's default
    "checkpoint_every": 0,  # also checkpoint every N steps within an epoch (large data sets)
    "cache_images": True,  # keep decoded images in memory (small data sets)
}
HOMOGRAPHY = {"homography": ("homography", default_conf["homography"])}  # the nested conf

# Knobs that may change when a run is resumed: they do not change what is computed.
RESUMABLE = {"epochs", "stage1_epochs", "device", "num_workers", "threads", "checkpoint_every", "cache_images",
             "cache_dir"}  # fmt: skip
OBJECTIVES = ("classification_weight", "matchability_weight", "verified_weight")


# -- data -------------------------------------------------------------------------------------
def read_train_manifest(uri):
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


def match_items(match):
    """Images and verified pairs of a `delf-index match` output, as training data without
    labels: ([{id, location, landmark_id}], [(id_a, id_b)]). An image's class is its cluster
    of the match graph (so that the validation split holds whole clusters' pairs); the pairs
    are those with at least the match's own `min_inliers`. Images no longer in the index
    the match was made from are left out, with a count."""
    match = match.rstrip("/")
    try:
        summary = json.loads(storage.read_bytes(posixpath.join(match, "_SUMMARY.json")))
    except FileNotFoundError as e:
        raise UserError(f"{match} holds no match output (no _SUMMARY.json): run delf-index match first") from e
    image_ids, uris, _ = artifact.read_images(summary["index"])
    location = dict(zip(image_ids, uris))
    clusters = {r["image_id"]: r["cluster"] for r in storage.read_parquet_rows(posixpath.join(match, "clusters"))}
    least = summary["conf"].get("min_inliers", 1)
    edges = storage.read_parquet_rows(posixpath.join(match, "pairs"))
    pairs = [(r["image_a"], r["image_b"]) for r in edges if (r["inliers"] or 0) >= least]
    kept = [(a, b) for a, b in pairs if a in location and b in location]
    if len(kept) < len(pairs):
        logger.warning("%d verified pairs name images no longer in %s: left out", len(pairs) - len(kept),
                       summary["index"])  # fmt: skip
    if not kept:
        raise UserError(f"{match}: no verified pair with {least} inliers or more to train on")
    ids = sorted({i for pair in kept for i in pair})
    items = [{"id": i, "location": location[i], "landmark_id": str(clusters.get(i, i))} for i in ids]
    return items, kept


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


class Trainer:
    """The network, its classifiers and one optimiser per stage; see the module docstring."""

    def __init__(self, conf, num_classes, device):
        self.conf, self.device = conf, device
        torch.manual_seed(conf["seed"])
        head = True if conf["norm_weight"] is None else {"norm_weight": conf["norm_weight"]}
        self.net = DELF(conf["backbone"], conf["feature_layer"], attention=head)
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
        logits = self.head_logits(feats)
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
            return {"val_acc": None, "val_loss": None}
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
        return {"val_acc": correct / len(dataset.items), "val_loss": total / len(dataset.items)}

    def head_logits(self, feats):
        """The head's logits of cells given as rows, [n, C] -> [n]."""
        return self.net.attention.logits(feats.T[None, :, :, None])[0, :, 0]

    def level_classification(self, cells, labels, rng):
        """DELF's classification loss on cached cells: each of `batch_size` samples is one
        pyramid level of one image (DELF's random rescaling), its L2-normalised features
        weighted by the head's scores and averaged, then classified. Returns (loss, correct,
        count)."""
        chosen = rng.integers(0, len(cells), self.conf["batch_size"])
        parts = []
        for i in chosen:
            levels = np.unique(cells[i].level)
            keep = cells[i].level == levels[rng.integers(len(levels))]
            parts.append(cells[i].features[torch.from_numpy(keep)])
        logits = self.classifiers["2"](self.pool_levels(parts))
        target = torch.tensor([labels[i] for i in chosen], device=self.device)
        return F.cross_entropy(logits, target), int((logits.argmax(1) == target).sum()), len(chosen)

    def pool_levels(self, parts):
        """Attention pooling of each level's cells ([n_i, C] each) -> [len(parts), C]; one call
        of the head for all of them (its BatchNorm sees the whole batch, as with crops)."""
        feats = torch.cat(parts).float().to(self.device)
        weighted = F.normalize(feats, dim=1) * F.softplus(self.head_logits(feats))[:, None]
        return torch.stack([part.mean(0) for part in torch.split(weighted, [len(p) for p in parts])])

    @torch.no_grad()
    def validate_cells(self, cells, labels):
        """Validation on held-out images' cached cells: classification accuracy and loss (the
        level nearest the original size of each image), and the share of an image's verified
        cells among its best `val_features` by the head (mean over images with a verified pair;
        `verified_share`, what selection keeps of what matches)."""
        self.set_mode(2, training=False)
        out = {"val_acc": None, "val_loss": None, "val_verified_share": None, "val_verified_share_l2norm": None}
        if not cells:
            return out
        if self.conf["classification_weight"] > 0:
            unit = int(np.argmin(np.abs(np.log(np.asarray(self.conf["scales"])))))
            parts = [c.features[torch.from_numpy(c.level == (unit if (c.level == unit).any() else c.level.max()))]
                     for c in cells]  # fmt: skip
            logits = self.classifiers["2"](self.pool_levels(parts))
            target = torch.tensor(labels, device=self.device)
            out["val_acc"] = float((logits.argmax(1) == target).float().mean())
            out["val_loss"] = float(F.cross_entropy(logits, target))
        scored = [(c, self.head_logits(c.features.float().to(self.device)).cpu().numpy()) for c in cells if c.pairs]
        if scored:
            out["val_verified_share"] = verified_share(scored, self.conf["val_features"])
            # the untrained ranking's share, the figure to beat
            norms = [(c, torch.linalg.vector_norm(c.features.float(), dim=1).numpy()) for c, _ in scored]
            out["val_verified_share_l2norm"] = verified_share(norms, self.conf["val_features"])
        return out


def verified_share(scored, k):
    """Mean over images of the share of their verified cells among their k best-scored cells:
    `scored` is [(PyramidCells, scores [n])]."""
    shares = []
    for cells, scores in scored:
        best = np.argsort(-scores, kind="stable")[:k]
        shares.append(cells.verified[best].sum() / max(cells.verified.sum(), 1))
    return float(np.mean(shares))


# -- what a stage learns from --------------------------------------------------------------------
class CellSource:
    """Stage 2 from the cached pyramid cells: a step classifies `batch_size` pyramid levels and
    ranks the verified cells of `verified_images` images first; no backbone runs."""

    def __init__(self, conf, cells, labels):
        self.conf, self.cells, self.labels = conf, cells, labels
        self.steps_per_epoch = -(-len(cells) * conf["crops_per_image"] // conf["batch_size"])

    def batches(self, epoch, start_step):
        return range(start_step, self.steps_per_epoch)

    def losses(self, trainer, step_data, epoch, step):
        conf = self.conf
        rng = np.random.default_rng([conf["seed"], 2, epoch, step])
        out, correct, seen = {}, 0, 0
        if conf["classification_weight"] > 0:
            loss, correct, seen = trainer.level_classification(self.cells, self.labels, rng)
            out["classification"] = conf["classification_weight"] * loss
        if conf["verified_weight"] > 0:
            term = trainer.verified_loss(self.cells, rng)
            if term is not None:
                out["verified"] = conf["verified_weight"] * term
        return out, correct, seen


class CropSource:
    """Random rescaled crops through the backbone every step (stage 1; stage 2 with
    inputs="crops"), with the real-pair loss on `cells` when given."""

    def __init__(self, conf, stage, dataset, device, cells=None):
        self.conf, self.stage, self.dataset, self.device, self.cells = conf, stage, dataset, device, cells
        self.steps_per_epoch = -(-len(dataset.items) * conf["crops_per_image"] // conf["batch_size"])

    def batches(self, epoch, start_step):
        conf, batch = self.conf, self.conf["batch_size"]
        keys = epoch_keys(len(self.dataset.items), conf["crops_per_image"], conf["seed"], self.stage, epoch)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch,
            sampler=keys[start_step * batch :],
            num_workers=conf["num_workers"],
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def losses(self, trainer, data, epoch, step):
        out, correct, seen = trainer.losses(self.stage, data, training=True)
        if self.cells is not None:
            term = trainer.verified_loss(self.cells, np.random.default_rng([self.conf["seed"], 3, epoch, step]))
            if term is not None:
                out["verified"] = self.conf["verified_weight"] * term
        return out, correct, seen


def stage_source(trainer, stage, split, pairs, conf, output):
    """(what stage `stage` learns from, a function returning its validation figures)."""
    train_items, val_items = split
    pad = [int(round(v)) for v in trainer.net.mean.flatten().tolist()]
    if stage == 1 or conf["inputs"] == "crops":
        crops = conf["matchability_weight"] > 0 and stage == 2
        train_set = CropDataset(train_items, conf, trainer.stride, trainer.offset, pad, pairs=crops)
        val_set = CropDataset(val_items, conf, trainer.stride, trainer.offset, pad)
        cells = None
        if stage == 2 and conf["verified_weight"] > 0:
            cells = target_cells(trainer, train_set, pairs, conf, output, targets=True)
        return CropSource(conf, stage, train_set, trainer.device, cells), lambda: trainer.validate(stage, val_set)
    train_set = CropDataset(train_items, conf, trainer.stride, trainer.offset, pad)
    val_set = CropDataset(val_items, conf, trainer.stride, trainer.offset, pad)
    train_cells = target_cells(trainer, train_set, pairs, conf, output, targets=conf["verified_weight"] > 0)
    val_cells = target_cells(trainer, val_set, pairs, conf, output, targets=conf["val_features"] > 0)
    train_labels = [it["label"] for it in train_items]
    val_labels = [it["label"] for it in val_items]
    return CellSource(conf, train_cells, train_labels), lambda: trainer.validate_cells(val_cells, val_labels)


def target_cells(trainer, dataset, pairs, conf, output, targets):
    """PyramidCells of a dataset's images (cached), and with `targets` the cells of verified
    pairs marked: `pairs` [(id_a, id_b)] within the dataset, or, when None, same-class pairs
    (at most `verified_pairs` per class). Logs how many pairs and cells were verified."""
    start = time.perf_counter()
    trainer.set_mode(2, training=False)
    cache = conf["cache_dir"] or os.path.join(output, "cache")
    items = dataset.items
    progress = Progress(len(items), "pyramid cells")
    cells = cells_lib.image_cells(trainer, items, dataset.image, conf["scales"], cache, progress)
    if not targets:
        return cells
    if pairs is None:
        chosen = cells_lib.class_pairs([it["label"] for it in items], conf["verified_pairs"], conf["seed"])
    else:
        position = {it["id"]: n for n, it in enumerate(items)}
        chosen = [(position[a], position[b]) for a, b in pairs if a in position and b in position]
    key = hashlib.sha1(json.dumps([cells_lib.network_key(trainer.net), list(conf["scales"]),
                                   [it["location"] for it in items], chosen]).encode()).hexdigest()[:24]  # fmt: skip
    matched = Progress(len(chosen), "verified pairs")
    verified, tried = cells_lib.verified_targets(cells, chosen, os.path.join(cache, f"pairs-{key}.npz"), matched)
    positives = sum(int(c.verified.sum()) for c in cells)
    total = sum(len(c.verified) for c in cells)
    logger.info("real-pair targets: %d of %d pairs verified, %.2f%% of %d cells, %.0fs", verified, tried,
                100 * positives / max(total, 1), total, time.perf_counter() - start)  # fmt: skip
    return cells


# -- training ---------------------------------------------------------------------------------
def check_conf(conf):
    """The training conf `conf` (resolved: runtime.conf.resolve_conf) completed and checked: no
    objective, settings that do not fit."""
    conf["homography"] = {**default_conf["homography"], **conf["homography"]}
    conf["scale_range"], conf["scales"] = tuple(conf["scale_range"]), tuple(conf["scales"])
    # recorded resolved: the head fits this layer only, whatever the default becomes
    conf["feature_layer"] = conf["feature_layer"] or DEFAULT_FEATURE_LAYER[conf["backbone"]]
    if conf["epochs"] and not any(conf[k] > 0 for k in OBJECTIVES):
        raise UserError("no training objective: set classification_weight, matchability_weight or verified_weight")
    if conf["crop_size"] % 32:
        raise UserError(f"crop_size must be a multiple of 32, got {conf['crop_size']}")
    if conf["inputs"] not in ("cells", "crops"):
        raise UserError(f"inputs {conf['inputs']!r}: use cells or crops")
    if conf["inputs"] == "cells" and conf["matchability_weight"] > 0:
        raise UserError("the matchability objective warps crops: set inputs=crops with matchability_weight")
    return conf


def resume_state(output, conf, resume):
    """The checkpoint to continue from (None: start afresh); refuses options that changed."""
    path = os.path.join(output, "checkpoint.pt")
    if not resume or not os.path.exists(path):
        if resume:
            logger.info("no checkpoint in %s: starting afresh", output)
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = sorted(k for k in conf if k not in RESUMABLE and state["conf"].get(k) != conf[k])
    if changed:
        raise UserError(f"cannot resume {output}: options differ from the run's ({', '.join(changed)})")
    logger.info("resuming %s at stage %d, epoch %d, step %d", output, state["stage"], state["epoch"], state["step"])
    return state


def train(manifest, output, conf=None, resume=False, match=None):
    """Train as the module docstring says, on a GLDv2-style `manifest` or, with `match` (a
    `delf-index match` output) instead, on the verified pairs of a collection's own match
    graph; returns the per-epoch history (also history.json)."""
    conf = check_conf(resolve_conf(conf, default_conf, "training", parts=HOMOGRAPHY))
    if (manifest is None) == (match is None):
        raise UserError("train on a manifest (train.csv) or on a match output (--from-match), one of them")
    if conf["threads"]:
        torch.set_num_threads(int(conf["threads"]))
    device = torch.device(conf["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(output, exist_ok=True)
    state = resume_state(output, conf, resume)
    items, pairs = (read_train_manifest(manifest), None) if match is None else match_items(match)
    train_items, val_items, classes = split_items(items, conf["val_fraction"], conf["seed"])
    logger.info("%d images, %d classes: %d for training, %d for validation", len(items), len(classes),
                len(train_items), len(val_items))  # fmt: skip
    split = {"classes": classes, "train": [it["id"] for it in train_items], "val": [it["id"] for it in val_items]}
    _write_json(split, os.path.join(output, "split.json"))
    _write_json({**conf, "manifest": manifest, "from_match": match}, os.path.join(output, "conf.json"))
    trainer = Trainer(conf, len(classes), device)
    if state:
        trainer.net.load_state_dict(state["model"])
        trainer.classifiers.load_state_dict(state["classifiers"])
    history = state["history"] if state else []
    for stage in (1, 2):
        if (conf["stage1_epochs"] if stage == 1 else conf["epochs"]) == 0 or (state and state["stage"] > stage):
            continue
        source, validate = stage_source(trainer, stage, (train_items, val_items), pairs, conf, output)
        run_stage(trainer, stage, source, validate, output, state if state and state["stage"] == stage else None,
                  history)  # fmt: skip
        if stage == 1:
            backbone = {k: v.cpu() for k, v in trainer.net.backbone.state_dict().items()}
            _save(backbone, os.path.join(output, "backbone.pt"))
        state = None  # the next stage starts afresh
    if conf["epochs"]:
        head = {k: v.cpu() for k, v in trainer.net.attention.state_dict().items()}
        _save(head, os.path.join(output, "attention.pt"))
    _write_json(history, os.path.join(output, "history.json"))
    return history


def run_stage(trainer, stage, source, validate, output, state, history):
    """The epochs of one stage (from `state`, a checkpoint of this stage, when resuming): an
    optimiser with cosine decay, validation and a checkpoint after every epoch."""
    conf = trainer.conf
    epochs = conf["stage1_epochs"] if stage == 1 else conf["epochs"]
    base_lr = conf["stage1_lr"] if stage == 1 else conf["lr"]
    optimizer = torch.optim.AdamW(trainer.parameters(stage), lr=base_lr, weight_decay=conf["weight_decay"])
    start_epoch = start_step = 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_step = state["epoch"], state["step"]
    ckpt_path = os.path.join(output, "checkpoint.pt")
    for epoch in range(start_epoch, epochs):
        start = time.perf_counter()
        sums, counts = run_epoch(trainer, optimizer, source, stage, epoch, start_step, history, ckpt_path)
        seconds = time.perf_counter() - start
        done = max(source.steps_per_epoch - start_step, 1)
        record = {"stage": stage, "epoch": epoch + 1, **{k: v / done for k, v in sums.items()},
                  "train_acc": counts["correct"] / max(counts["seen"], 1), **validate(),
                  "seconds": round(seconds, 2), "steps_per_s": round(done / max(seconds, 1e-9), 2)}  # fmt: skip
        history.append(record)
        logger.info("%s", json.dumps(record))
        start_step = 0
        _save(_checkpoint(trainer, optimizer, conf, stage, epoch + 1, 0, history), ckpt_path)
        _write_json(history, os.path.join(output, "history.json"))


def run_epoch(trainer, optimizer, source, stage, epoch, start_step, history, ckpt_path):
    """The steps of one epoch from `start_step`: (summed loss terms, {correct, seen})."""
    conf = trainer.conf
    epochs = conf["stage1_epochs"] if stage == 1 else conf["epochs"]
    base_lr = conf["stage1_lr"] if stage == 1 else conf["lr"]
    steps = source.steps_per_epoch
    trainer.set_mode(stage, training=True)
    progress = Progress(steps, f"stage {stage} epoch {epoch + 1}/{epochs}")
    sums, counts = {}, {"correct": 0, "seen": 0}
    step = start_step
    for data in source.batches(epoch, start_step):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(base_lr, epoch * steps + step, epochs * steps)
        losses, correct, seen = source.losses(trainer, data, epoch, step)
        step += 1
        if losses:  # else nothing to learn from in this batch
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in {**losses, "loss": loss}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        counts["correct"], counts["seen"] = counts["correct"] + correct, counts["seen"] + seen
        accuracy = counts["correct"] / max(counts["seen"], 1)
        progress.update(step, loss=sums.get("loss", 0.0) / (step - start_step), acc=accuracy)
        if conf["checkpoint_every"] and step % conf["checkpoint_every"] == 0 and step < steps:
            _save(_checkpoint(trainer, optimizer, conf, stage, epoch, step, history), ckpt_path)
    return sums, counts


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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="train.csv (id, url or path, landmark_id); any fsspec URI")
    source.add_argument(
        "--from-match",
        metavar="MATCH",
        help="no labels: learn which features to keep from the verified pairs of this `delf-index match` output "
        "(the verified-pairs objective alone, unless --conf says otherwise)",
    )
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
    # the match graph has no labels to classify: its pairs are the objective
    conf = {"classification_weight": 0.0, "verified_weight": 1.0} if args.from_match else {}
    for item in args.conf:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--conf takes KEY=VALUE, got {item!r}")
        conf[key] = _parse_value(value)
    for key in ("epochs", "stage1_epochs", "seed", "device", "backbone", "weights"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
    history = train(args.manifest, args.output, conf, resume=args.resume, match=args.from_match)
    last = {}
    for record in history:
        last[record["stage"]] = record
    for stage, record in sorted(last.items()):
        figures = [f"loss {record.get('loss', float('nan')):.4f}"]
        for key, name in (("val_acc", "validation accuracy"), ("val_verified_share", "verified share")):
            if record.get(key) is not None:
                figures.append(f"{name} {record[key]:.3f}")
        print(f"stage {stage}: {record['epoch']} epochs, {', '.join(figures)}")
    print(f"wrote {os.path.join(args.output, 'attention.pt')}")
    return 0
