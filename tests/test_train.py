"""Attention training: manifests over fsspec, crops and homography pairs, what the head learns,
seeded runs, checkpoints and resume. Tiny runs on a handful of images."""

import io
import json
import posixpath
import uuid

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cv2
from PIL import Image

from delf_index.model import cells as C
from delf_index.model import crops
from delf_index.model import train as T
from delf_index.model.backbones import EfficientNetLite
from delf_index.model.export import build_model
from delf_index.runtime import storage
from tests.conftest import rgb

TINY = {
    "image_size": 192,
    "crop_size": 96,
    "scale_range": (0.5, 1.0),
    "crops_per_image": 2,
    "batch_size": 4,
    "val_fraction": 0.34,
    "val_size": 128,
    "threads": 1,
    "device": "cpu",
}


def _put(fs, path, image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    fs.pipe(path, buf.getvalue())


@pytest.fixture
def memory_manifest(photos):
    """A GLDv2-shaped manifest on fsspec's memory filesystem: 4 landmarks x 3 images (the
    photo, a shifted crop and a zoomed crop of it), relative paths, URL rows and one
    unlabelled row."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"/train-{uuid.uuid4().hex[:8]}"
    lines = ["id,url,path,landmark_id"]
    for k, (name, photo) in enumerate(sorted(photos.items())):
        photo = cv2.resize(rgb(photo), (192, 144), interpolation=cv2.INTER_AREA)
        _put(fs, f"{root}/images/{name}_a.jpg", photo)
        _put(fs, f"{root}/images/{name}_b.jpg", np.ascontiguousarray(photo[8:, 12:]))
        lines.append(f"{name}_a,,images/{name}_a.jpg,{1000 + k}")
        # GLDv2 rows carry a url; a full URI in it is read as it is
        lines.append(f"{name}_b,memory://{root}/images/{name}_b.jpg,,{1000 + k}")
        zoomed = cv2.resize(photo[20:120, 30:170], (192, 137), interpolation=cv2.INTER_LINEAR)
        _put(fs, f"{root}/images/{name}_c.jpg", zoomed)
        lines.append(f"{name}_c,,images/{name}_c.jpg,{1000 + k}")
    lines.append("unlabelled,,images/astronaut_a.jpg,")
    fs.pipe(f"{root}/train.csv", ("\n".join(lines) + "\n").encode())
    yield f"memory://{root}/train.csv"
    fs.rm(root, recursive=True)


def test_manifest_over_fsspec_and_split(memory_manifest):
    items = T.read_train_manifest(memory_manifest)
    assert len(items) == 12, "the unlabelled row is skipped"
    assert items[0]["location"].startswith("memory://") and items[0]["location"].endswith("images/astronaut_a.jpg")
    assert crops.load_image(items[1]["location"], 100).shape == (76, 100, 3)  # 136x180 shrunk to 100 on its long side
    train, val, classes = T.split_items(items, 0.34, seed=0)
    assert classes == ["1000", "1001", "1002", "1003"]
    assert len(train) == 8 and sorted(it["label"] for it in val) == [0, 1, 2, 3]
    again = T.split_items(items, 0.34, seed=0)
    assert [it["id"] for it in again[1]] == [it["id"] for it in val], "seeded"
    # a class never loses its last training image
    train, val, _ = T.split_items(items, 0.9, seed=0)
    assert len(train) == 4


def test_manifest_errors(tmp_path):
    (tmp_path / "m.csv").write_text("id,landmark_id\na,1\n")
    with pytest.raises(ValueError, match="url or path"):
        T.read_train_manifest(str(tmp_path / "m.csv"))
    with pytest.raises(ValueError, match="unknown training options"):
        T.train(str(tmp_path / "m.csv"), str(tmp_path / "out"), {"epoch": 3})


def test_local_features_equal_the_backbone_output():
    for layer in ("stage4", "stage6_expand"):
        backbone = EfficientNetLite("efficientnet_lite0", layer).eval()
        x = torch.randn(1, 3, 64, 96)
        with torch.no_grad():
            torch.testing.assert_close(T.local_features(backbone, x), backbone(x)[0])


def test_second_view_is_the_homography_of_the_first(photos):
    """Pixel p of a crop reappears at H p in the warped view (no photometric change)."""
    conf = {**T.default_conf, "crop_size": 128, "scale_range": (0.5, 1.5)}
    conf["homography"] = {**conf["homography"], "photometric": 0.0}
    image = rgb(photos["coffee"])
    ds = crops.CropDataset([{"location": None, "label": 0}], conf, 16, 15, [128] * 3, pairs=True)
    ds.cache[0] = image
    for seed in range(5):
        item = ds[(0, seed)]
        a, b, hom = item["image"].numpy(), item["image_b"].numpy(), item["homography"].numpy()
        ys, xs = np.mgrid[20:108:4, 20:108:4]
        pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], 1) @ hom.T
        pts = pts[:, :2] / pts[:, 2:]
        inside = (pts > 2).all(1) & (pts < 125).all(1)
        assert inside.sum() > 50
        sampled = cv2.remap(b, pts[:, 0].astype(np.float32)[:, None], pts[:, 1].astype(np.float32)[:, None], 1)
        diff = np.abs(sampled[:, 0].astype(float) - a[ys.ravel(), xs.ravel()].astype(float))[inside]
        assert np.median(diff) < 12, seed
        assert item["mask"].shape == item["mask_b"].shape == (8, 8)


def test_matchability_targets():
    torch.manual_seed(0)
    feats = torch.randn(16, 6, 6)
    mask = torch.ones(6, 6, dtype=torch.bool)
    ident = torch.eye(3, dtype=torch.float64)
    ta, tb = crops.matchability_labels(feats, feats, mask, mask, ident, 16, 15, 16.0)
    assert (ta == 1).all() and (tb == 1).all()
    # view b shifted one cell to the right: column j of a is column j + 1 of b
    shifted = torch.zeros_like(feats)
    shifted[:, :, 1:] = feats[:, :, :-1]
    shift = torch.tensor([[1, 0, 16], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    ta, tb = crops.matchability_labels(feats, shifted, mask, mask, shift, 16, 15, 16.0)
    ta, tb = ta.reshape(6, 6), tb.reshape(6, 6)
    assert (ta[:, -1] == -1).all() and (tb[:, 0] == -1).all(), "no counterpart: ignored"
    assert (ta[:, :-1] == 1).all() and (tb[:, 1:] == 1).all()
    # unrelated descriptors: (almost) nothing is matchable
    ta, _ = crops.matchability_labels(feats, torch.randn(16, 6, 6), mask, mask, ident, 16, 15, 16.0)
    assert (ta == 0).float().mean() > 0.8


def test_real_pair_targets(photos):
    """Cells verified between a photo and a zoomed, shifted crop of it; none between two
    different photos."""
    conf = {**T.default_conf, "device": "cpu"}
    trainer = T.Trainer(conf, 2, torch.device("cpu"))
    trainer.set_mode(2, training=False)
    coffee = cv2.resize(rgb(photos["coffee"]), (320, 240), interpolation=cv2.INTER_AREA)
    zoomed = cv2.resize(coffee[30:210, 40:280], (320, 240), interpolation=cv2.INTER_LINEAR)
    other = cv2.resize(rgb(photos["astronaut"]), (320, 240), interpolation=cv2.INTER_AREA)
    scales = (0.5, 0.7071, 1.0, 1.4142)
    with torch.no_grad():
        images = (coffee, zoomed, other, other[:, ::-1].copy())
        cells = [C.PyramidCells.compute(trainer, image, scales) for image in images]
    count = sum(round(240 * s) // 16 * (round(320 * s) // 16) for s in scales)
    assert cells[0].features.shape == (count, trainer.net.backbone.local_dim)
    pairs = C.class_pairs([0, 0, 1, 1], max_pairs=5, seed=0)
    assert pairs == [(0, 1), (2, 3)]
    verified, tried = C.verified_targets(cells, pairs)
    assert (verified, tried) == (1, 2), "a mirror image is no affine match"
    a, b = cells[0], cells[1]
    assert a.verified.sum() >= 8 and a.verified.sum() == b.verified.sum()
    assert not cells[2].verified.any()
    # verified cells of the crop sit where the zoom sends them: x_b = (x_a - 40) * 320 / 240
    va = a.xy[a.verified]
    assert ((va[:, 0] > 20) & (va[:, 0] < 300) & (va[:, 1] > 10) & (va[:, 1] < 230)).mean() > 0.9


def test_attention_learns_where_the_classes_differ(photos, tmp_path):
    """Left half tells the class, right half is one of two textures whatever the class: the
    trained attention must score the discriminative half higher."""
    rocket = cv2.resize(rgb(photos["rocket"]), (128, 256), interpolation=cv2.INTER_AREA)
    textures = [rocket, np.ascontiguousarray(rocket[::-1, ::-1])]
    lines = ["id,path,landmark_id"]
    for k, name in enumerate(("astronaut", "coffee", "chelsea")):
        for flip in (0, 1):
            left = cv2.resize(rgb(photos[name]), (128, 256), interpolation=cv2.INTER_AREA)
            left = left[::-1] if flip else left
            Image.fromarray(np.concatenate([left, textures[flip]], axis=1)).save(tmp_path / f"{name}{flip}.png")
            lines.append(f"{name}{flip},{name}{flip}.png,{k}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    conf = {
        **TINY,
        "image_size": 256,
        "crop_size": 256,
        "scale_range": (1.0, 1.0),
        "scales": (1.0,),  # the whole image, at its size: one level per sample
        "val_fraction": 0.0,
        "crops_per_image": 2,
        "epochs": 8,
        "lr": 3e-3,
        "feature_layer": "stage4",  # a receptive field (147 px) narrower than a half
    }
    history = T.train(str(tmp_path / "train.csv"), str(tmp_path / "run"), conf)
    assert history[-1]["loss"] < history[0]["loss"]
    model, _ = build_model(attention=str(tmp_path / "run" / "attention.pt"), feature_layer="stage4")
    image = np.array(Image.open(tmp_path / "coffee0.png"))
    with torch.no_grad():
        _, scores, _ = model(torch.from_numpy(image)[None])
    scores = scores[0].numpy()
    # cells whose receptive field lies in one half only (the field is 147 px wide)
    unique, shared = scores[:, :3].mean(), scores[:, -4:].mean()
    assert unique > 4 * shared, (unique, shared)  # an untrained head: 1.7x, L2 norm 1.2x


@pytest.mark.parametrize("inputs", ["cells", "crops"])
def test_training_is_seeded_and_resumes_exactly(memory_manifest, tmp_path, monkeypatch, inputs):
    conf = {**TINY, "stage1_epochs": 1, "epochs": 2, "checkpoint_every": 1, "inputs": inputs}
    conf.update(verified_weight=1.0, scales=(0.7071, 1.0, 1.4142), cache_dir=str(tmp_path / "cache"))
    terms = ("classification", "verified")
    if inputs == "crops":  # what only crops can learn from
        conf["matchability_weight"], terms = 1.0, (*terms, "matchability")
    history = T.train(memory_manifest, str(tmp_path / "a"), conf)
    assert [(h["stage"], h["epoch"]) for h in history] == [(1, 1), (2, 1), (2, 2)]
    assert all(0 <= h["val_acc"] <= 1 and h["train_acc"] <= 1 for h in history)
    assert min(history[-1][k] for k in terms) > 0
    reference = torch.load(tmp_path / "a" / "attention.pt", weights_only=True)
    assert set(reference) == {f"{m}.{p}" for m in ("conv1", "conv2") for p in ("weight", "bias")} | {
        f"bn.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    assert (tmp_path / "a" / "backbone.pt").exists()
    build_model(weights=str(tmp_path / "a" / "backbone.pt"), attention=str(tmp_path / "a" / "attention.pt"))

    # interrupted in the middle of stage 2's second epoch, then resumed: the same weights
    calls = {"n": 0}
    source = T.CellSource if inputs == "cells" else T.CropSource
    losses = source.losses

    def interrupted(self, trainer, data, epoch, step):
        calls["n"] += getattr(self, "stage", 2) == 2  # stage 1 learns from crops too
        if calls["n"] == 6:  # 4 steps per epoch: the second step of epoch 2
            raise KeyboardInterrupt
        return losses(self, trainer, data, epoch, step)

    monkeypatch.setattr(source, "losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train(memory_manifest, str(tmp_path / "b"), conf)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (state["stage"], state["epoch"], state["step"]) == (2, 1, 1), "checkpointed within the epoch"
    monkeypatch.setattr(source, "losses", losses)
    with pytest.raises(ValueError, match="options differ"):
        T.train(memory_manifest, str(tmp_path / "b"), {**conf, "lr": 0.1}, resume=True)
    resumed = T.train(memory_manifest, str(tmp_path / "b"), conf, resume=True)
    assert [h["epoch"] for h in resumed] == [1, 1, 2]
    again = torch.load(tmp_path / "b" / "attention.pt", weights_only=True)
    for key in reference:
        torch.testing.assert_close(again[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    for before, after in zip(history[:2], resumed[:2]):  # epochs finished before the interruption
        assert before["loss"] == after["loss"] and before["val_acc"] == after["val_acc"]


def test_cli(memory_manifest, tmp_path, capsys):
    from delf_index.pipelines.cli import main

    out = tmp_path / "cli"
    conf = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]
    assert main(["train", "--manifest", memory_manifest, "--output", str(out), "--epochs", "1", "--conf", *conf]) == 0
    assert "stage 2: 1 epochs" in capsys.readouterr().out
    assert json.loads((out / "history.json").read_text())[0]["val_acc"] is not None
    assert main(["train", "--manifest", memory_manifest, "--output", str(out), "--conf", "nonsense"]) == 1


def test_a_head_that_corrects_the_l2_norm_starts_as_the_l2_norm(photos):
    """norm_weight: the untrained head ranks every cell exactly as the L2 norm does, in torch
    and in the exported model's attention output."""
    from delf_index.model.delf import DELF

    torch.manual_seed(0)
    net = DELF(attention={"norm_weight": 1.0}).eval()
    image = torch.from_numpy(cv2.resize(rgb(photos["coffee"]), (320, 224), interpolation=cv2.INTER_AREA))[None]
    with torch.no_grad():
        local, scores, _ = net(image)
    norms = torch.linalg.vector_norm(local, dim=1)
    assert torch.equal(scores.flatten().argsort(), norms.flatten().argsort())
    assert net.attention.norm_weight.requires_grad


def test_trains_a_head_on_landmarks_train(landmarks_train_dir, tmp_path):
    """A few images of two landmarks of landmarks-train: their real pairs verify, the head
    learns from them and exports."""
    with open(f"{landmarks_train_dir}/train.csv") as f:
        header, *rows = f.read().splitlines()
    chosen = [r for name in ("Sydney_Opera_House", "Pyramids") for r in [r for r in rows if r.startswith(name)][:8]]
    absolute = [r.replace(",images/", f",{landmarks_train_dir}/images/") for r in chosen]  # images stay put
    manifest = tmp_path / "train.csv"
    manifest.write_text("\n".join([header, *absolute]) + "\n")
    conf = {**TINY, "image_size": 256, "classification_weight": 0.0, "verified_weight": 1.0, "norm_weight": 1.0,
            "epochs": 2, "verified_pairs": 12, "val_fraction": 0.25, "scales": (0.7071, 1.0, 1.4142),
            "val_features": 100}  # fmt: skip
    history = T.train(str(manifest), str(tmp_path / "run"), conf)
    assert history[-1]["verified"] > 0 and 0 < history[-1]["val_verified_share"] <= 1
    model, provenance = build_model(attention=str(tmp_path / "run" / "attention.pt"))
    assert provenance["attention"]["type"] == "learned" and hasattr(model.attention, "norm_weight")


def test_trains_from_a_match_graph_without_labels(evaluated, tmp_path):
    """--from-match: the graph's edges are the real pairs, no label is needed or classified."""
    from delf_index.pipelines import match
    from delf_index.pipelines.cli import main

    with pytest.raises(ValueError, match="no match output"):
        T.train(None, str(tmp_path / "none"), match=str(tmp_path))
    out = str(tmp_path / "m")
    summary = match.run(str(evaluated[0] / "index"), out, conf={"sheet": False}, beam_options={"workers": 1})
    pairs = storage.read_parquet_rows(posixpath.join(out, "pairs"))
    edges = [p for p in pairs if p["inliers"] >= summary["conf"]["min_inliers"]]
    conf = {**TINY, "image_size": 256, "epochs": 1, "scales": (0.7071, 1.0), "val_fraction": 0.0}
    run = tmp_path / "run"
    options = [f"{k}={json.dumps(v)}" for k, v in conf.items()]
    args = ["train", "--from-match", out, "--output", str(run), "--conf", *options]
    assert main(args) == 0
    history = json.loads((run / "history.json").read_text())
    assert history[-1]["verified"] > 0 and "classification" not in history[-1]
    trained_on = set(json.loads((run / "split.json").read_text())["train"])
    assert trained_on == {i for p in edges for i in (p["image_a"], p["image_b"])}
    assert json.loads((run / "conf.json").read_text())["from_match"] == out
