"""fit -> build -> load on small real features; checksums, fingerprints, append, sampling."""

import io
import json
import os
import shutil

import faiss
import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from PIL import Image

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing import pca as pca_lib
from delf_index.indexing import shards
from delf_index.indexing.codebooks import bottom_k, sample_keys, train_index
from delf_index.indexing.manifests import ArtifactError, file_entries
from delf_index.indexing.versions import current_version
from delf_index.pipelines import build, extract, fit
from delf_index.pipelines.fit import BottomKSample
from delf_index.runtime import tables
from delf_index.schemas.artifact import BEFORE_7, DEAD_ROWS, dead_count
from delf_index.schemas.features import descriptors_of
from tests.conftest import ONE_WORKER, rgb


@pytest.fixture(scope="module")
def feature_tables(tmp_path_factory, photos):
    """Two features tables of real photos (and mirrored copies): 6 + 4 images; and the folders
    of their images."""
    root = tmp_path_factory.mktemp("features")
    groups = {"a": ("astronaut", "coffee", "chelsea"), "b": ("rocket", "coffee")}
    outputs = {}
    for group, names in groups.items():
        folder = root / f"images-{group}"
        outputs[f"images-{group}"] = str(folder)
        folder.mkdir()
        for name in names:
            image = np.ascontiguousarray(rgb(photos[name])[::2, ::2])
            for variant, array in (("", image), ("-mirror", image[:, ::-1])):
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(array)).save(buf, "JPEG", quality=92)
                (folder / f"{group}-{name}{variant}.jpg").write_bytes(buf.getvalue())
        outputs[group] = str(root / f"out-{group}")
        extract.run(str(folder), outputs[group], {"rows_per_shard": 2}, beam_options=ONE_WORKER)
    return outputs


@pytest.fixture(scope="module")
def codebooks(feature_tables, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("codebooks") / "cb")
    fit.run(feature_tables["a"], out, {"sample": 4000}, beam_options=ONE_WORKER)
    return out


def test_bottom_k_sample_does_not_depend_on_how_work_is_split():
    rng = np.random.default_rng(0)
    parts = []
    for image in range(12):
        n = int(rng.integers(50, 200))
        parts.append((sample_keys(f"img{image}", n, seed=3), rng.normal(size=(n, 4)).astype(np.float16)))
    keys = np.concatenate([k for k, _ in parts])
    desc = np.concatenate([d for _, d in parts])
    whole = bottom_k(keys, desc, 300)
    combine = BottomKSample(300)

    def partial(chunk):
        k, d = bottom_k(np.concatenate([p[0] for p in chunk]), np.concatenate([p[1] for p in chunk]), 300)
        return {"keys": k, "descriptors": d, "images": len(chunk), "descriptors_total": sum(len(p[0]) for p in chunk)}

    for split in ([parts], [parts[:5], parts[5:]], [parts[i::3] for i in range(3)]):
        acc = combine.merge_accumulators([partial(chunk) for chunk in split])
        np.testing.assert_array_equal(acc["keys"], whole[0])
        np.testing.assert_array_equal(acc["descriptors"], whole[1])
        assert acc["descriptors_total"] == len(keys)
    assert sample_keys("x", 5, 1).tolist() != sample_keys("x", 5, 2).tolist()


def test_the_sample_is_uniform_over_descriptors_not_images():
    """Images with 30 to 3000 descriptors: each is sampled in proportion to its count, and
    within an image every feature index equally (descriptors here carry their origin)."""
    counts = np.geomspace(30, 3000, 10).astype(int)
    parts = [
        (sample_keys(f"img{i}", n, seed=0), np.stack([np.full(n, i), np.arange(n) / n], axis=1))
        for i, n in enumerate(counts)
    ]
    k = 4000
    _, sample = bottom_k(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), k)
    drawn = np.bincount(sample[:, 0].astype(int), minlength=len(counts))
    expected = k * counts / counts.sum()
    chi2 = ((drawn - expected) ** 2 / expected).sum()
    assert chi2 < 27.9, (drawn, expected.round())  # 9 degrees of freedom, p = 0.001
    assert abs(sample[:, 1].mean() - 0.5) < 0.02  # positions within images: uniform, mean 1/2


def test_pca_is_the_eigendecomposition_of_the_sample_covariance_in_delf_order():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5000, 16)) * np.linspace(3, 0.1, 16) + rng.normal(size=16)
    pca = pca_lib.fit_pca(x, 4)
    # numpy's answer: L2-normalise, covariance, top eigenvectors
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    values, vectors = np.linalg.eigh(np.cov(xn, rowvar=False))
    top = vectors[:, ::-1][:, :4].T
    np.testing.assert_allclose(np.abs((pca["components"] * top).sum(axis=1)), 1, atol=1e-5)  # same axes up to sign
    np.testing.assert_allclose(pca["eigenvalues"], values[::-1][:4], rtol=1e-4)
    assert pca["explained_variance"] == pytest.approx(values[::-1][:4].sum() / values.sum(), rel=1e-5)
    # applied: centre, project, L2-normalise again (DELF); the signs follow the components
    y = pca_lib.apply_pca(x, pca)
    signs = np.sign((pca["components"] * top).sum(axis=1))
    expected = (xn - xn.mean(0)) @ (top * signs[:, None]).T
    np.testing.assert_allclose(y, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-4)
    whitened = pca_lib.apply_pca(x, {**pca, "whiten": True})
    ratio = whitened[:, 0] / whitened[:, 3] / (y[:, 0] / y[:, 3])  # whitening divides by sqrt(eigenvalue)
    np.testing.assert_allclose(ratio, np.sqrt(values[::-1][3] / values[::-1][0]), rtol=1e-3)
    # the queries' projection in faiss: the same to float32 rounding, whitened or not
    for conf in (pca, {**pca, "whiten": True}):
        np.testing.assert_allclose(pca_lib.apply_pca_in_faiss(x, conf), pca_lib.apply_pca(x, conf), atol=1e-5)
    assert pca_lib.apply_pca_in_faiss(x[:0], pca).shape == (0, 4)


def test_fit_build_load_round_trip(feature_tables, codebooks, tmp_path):
    with open(os.path.join(codebooks, "codebooks.json")) as f:
        manifest = json.load(f)
    assert manifest["index_string"].endswith(",PQ10x8") and manifest["conf"]["pca_dim"] == 40
    out = str(tmp_path / "index")
    built = build.run(feature_tables["a"], out, codebooks=codebooks, beam_options=ONE_WORKER)
    index = art.Artifact.load(out)
    features = dict(tables.iter_features(feature_tables["a"]))
    assert len(index) == len(features) == 6 and built["features"]["table_version"] == 1
    assert built["counts"]["descriptors"] == sum(len(f) for f in features.values()) == index.index.ntotal
    assert built["bytes_per_descriptor"] <= 24.1
    # geometry and image table agree with the features table
    rows = {i: {"x": f.x, "scale": f.scale, "width": f.width, "height": f.height} for i, f in features.items()}
    for row_number, image_id in enumerate(index.image_ids):
        xy, scale = index.geometry_of(row_number, [0, 5])
        np.testing.assert_allclose(xy[:, 0], np.rint(np.asarray(rows[image_id]["x"])[[0, 5]]))
        np.testing.assert_allclose(scale, np.asarray(rows[image_id]["scale"])[[0, 5]], rtol=1e-3)
        assert tuple(index.sizes[row_number]) == (rows[image_id]["width"], rows[image_id]["height"])
    # a database descriptor finds its own image
    query = features["a-coffee.jpg"]
    reduced = pca_lib.apply_pca(query.descriptors[:50], index.pca)
    _, ids = index.index.search(reduced, 1, params=faiss.SearchParametersIVF(nprobe=16))
    images, _ = art.split_ids(ids[:, 0])
    assert np.mean(np.asarray(index.image_ids)[images] == "a-coffee.jpg") > 0.8
    # global descriptors are rows of image ids
    g = query.global_descriptor[None]
    _, best = index.global_index.search(g, 1)
    assert index.image_ids[best[0, 0]] == "a-coffee.jpg"


def test_corrupted_truncated_and_foreign_artifacts_are_refused(feature_tables, codebooks, tmp_path):
    index = str(tmp_path / "index")
    build.run(feature_tables["a"], index, codebooks=codebooks, beam_options=ONE_WORKER)
    out = current_version(index)  # a version folder is a complete artifact of its own
    art.Artifact.load(out, model_fingerprint=art.Artifact.load(index).fingerprint)
    with pytest.raises(ArtifactError, match="made for model"):
        art.Artifact.load(out, model_fingerprint="0" * 64)
    broken = str(tmp_path / "broken")
    shutil.copytree(out, broken)
    with open(os.path.join(broken, "index.ivfdata"), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="index.ivfdata does not match its sha256"):
        art.Artifact.load(broken)
    shutil.copy(os.path.join(out, "index.ivfdata"), os.path.join(broken, "index.ivfdata"))
    with open(os.path.join(broken, "geometry.npy"), "r+b") as f:
        f.truncate(200)
    with pytest.raises(ArtifactError, match="geometry.npy has 200 bytes"):
        art.Artifact.load(broken)
    os.remove(os.path.join(broken, "manifest.json"))
    with pytest.raises(ArtifactError, match="no manifest.json"):
        art.Artifact.load(broken)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["format_version"] = 99
    os.makedirs(broken + "2")
    for name in os.listdir(out):
        shutil.copy(os.path.join(out, name), os.path.join(broken + "2", name))
    with open(os.path.join(broken + "2", "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ArtifactError, match="format version 99"):
        art.Artifact.load(broken + "2")


def copy_with_properties(source, target, **changes):
    """A copy of the features table `source` at `target`, its delf_index properties changed."""
    shutil.copytree(source, target)
    DeltaTable(str(target)).alter.set_table_properties(
        {f"delf_index.{k}": v for k, v in changes.items()}, raise_if_not_exists=False
    )
    return str(target)


def test_features_of_another_model_or_other_settings_are_refused(feature_tables, codebooks, tmp_path):
    foreign = copy_with_properties(feature_tables["b"], tmp_path / "foreign", model_fingerprint="f" * 64)
    with pytest.raises(ArtifactError, match="come from model ffffffffffff"):
        build.run(foreign, str(tmp_path / "x"), codebooks=codebooks)
    settings = tables.snapshot(feature_tables["b"]).properties["extractor"]
    other = copy_with_properties(
        feature_tables["b"], tmp_path / "other", extractor=json.dumps({**settings, "max_features": 500})
    )
    index = str(tmp_path / "index")
    build.run(feature_tables["a"], index, codebooks=codebooks, beam_options=ONE_WORKER)
    with pytest.raises(ArtifactError, match="extracted with other settings than the index"):
        build.run(other, index, append=True, beam_options=ONE_WORKER)
    # a table holds one model and one set of settings: other ones are refused before any work
    with pytest.raises(UserError, match="holds features of model .* with other extraction settings"):
        extract.run(feature_tables["images-a"], feature_tables["b"], {"extractor": {"max_features": 500}})


def test_what_the_index_cannot_hold_is_refused_not_clipped():
    table = pa.table({"image_id": ["many.jpg"], "x": [[1.0]], "y": [[2.0]]})
    with pytest.raises(ArtifactError, match="many.jpg has 65536 features; an index holds at most 65535"):
        shards.check_ranges(table, np.array([65536]))
    wide = pa.table({"image_id": ["ok.jpg", "panorama.jpg"], "x": [[5.0], [10.0, 70000.0]], "y": [[1.0], [3.0, 4.0]]})
    with pytest.raises(ArtifactError, match="panorama.jpg has a keypoint at x = 70000.0, beyond"):
        shards.check_ranges(wide, np.array([1, 2]))
    shards.check_ranges(wide.slice(0, 1), np.array([1]))  # in range: no complaint


def test_an_index_written_before_format_7_still_loads_and_appends(feature_tables, codebooks, tmp_path):
    """Versions before format 7 name their dead rows hidden.npy and count them under another
    key: they load with those rows unserved, and an append onto one carries them into
    dead.npy (the image, still live in the table, is added again as a new row)."""
    index = str(tmp_path / "index")
    build.run(feature_tables["a"], index, codebooks=codebooks, beam_options=ONE_WORKER)
    version = current_version(index)
    with open(os.path.join(version, "manifest.json")) as f:
        manifest = json.load(f)
    row = art.Artifact.load(index).row_of["a-coffee.jpg"]
    os.remove(os.path.join(version, DEAD_ROWS))
    np.save(os.path.join(version, BEFORE_7["dead_rows"]), np.array([row], np.int64))
    del manifest["files"][DEAD_ROWS], manifest["counts"]["dead"]
    manifest["files"].update(file_entries(version, [BEFORE_7["dead_rows"]]))
    manifest.update(format_version=6, counts={**manifest["counts"], BEFORE_7["dead_count"]: 1, "images": 5})
    with open(os.path.join(version, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    old = art.Artifact.load(index)
    assert len(old) == 5 and "a-coffee.jpg" not in old.row_of and old.dead.tolist() == [row]
    assert "a-coffee.jpg" not in art.read_images(index)[0]
    appended = build.run(feature_tables["a"], index, append=True, beam_options=ONE_WORKER)
    assert appended["format_version"] == 7 and BEFORE_7["dead_rows"] not in appended["files"]
    assert (appended["counts"]["images"], dead_count(appended["counts"])) == (6, 1)
    new = art.Artifact.load(index)
    assert new.dead.tolist() == [row] and new.row_of["a-coffee.jpg"] == 6


def test_append_equals_a_build_of_everything(feature_tables, codebooks, tmp_path):
    table = str(tmp_path / "table")
    keep = {"max_change": None}
    extract.run(feature_tables["images-a"], table, keep, beam_options=ONE_WORKER)
    grown = str(tmp_path / "grown")
    build.run(table, grown, codebooks=codebooks, beam_options=ONE_WORKER)
    extract.run(feature_tables["images-b"], table, keep, beam_options=ONE_WORKER, keep_unlisted=True)
    appended = build.run(table, grown, append=True, beam_options=ONE_WORKER)
    full = str(tmp_path / "full")
    build.run(table, full, codebooks=codebooks, beam_options=ONE_WORKER)
    a, b = art.Artifact.load(full), art.Artifact.load(grown)
    assert a.image_ids == b.image_ids and appended["counts"] == a.manifest["counts"] and len(a) == 10
    np.testing.assert_array_equal(np.asarray(a.geometry), np.asarray(b.geometry))
    queries = np.random.default_rng(0).normal(size=(20, a.pca["mean"].shape[0])).astype(np.float32)
    queries = pca_lib.apply_pca(queries, a.pca)
    params = faiss.SearchParametersIVF(nprobe=8)
    np.testing.assert_array_equal(
        a.index.search(queries, 5, params=params)[1], b.index.search(queries, 5, params=params)[1]
    )
    # nothing new in the table: nothing to do, the current version stays
    again = build.run(table, grown, append=True, beam_options=ONE_WORKER)
    assert again["version"] == appended["version"]


def test_failed_images_are_left_out_and_a_table_without_images_is_a_clear_error(feature_tables, codebooks, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    failed = str(tmp_path / "failed")
    assert extract.run(str(bad), failed, beam_options=ONE_WORKER)["failed"] == 1
    with pytest.raises(ValueError, match="holds no live images.*status 'failed'"):
        fit.run(failed, str(tmp_path / "cb"), beam_options=ONE_WORKER)
    # failures next to good images: fit and build read the extracted records only
    mixed = str(tmp_path / "mixed")
    shutil.copytree(feature_tables["a"], mixed)
    extract.run(str(bad), mixed, beam_options=ONE_WORKER, keep_unlisted=True)
    fit.run(mixed, str(tmp_path / "cb2"), {"sample": 4000}, beam_options=ONE_WORKER)
    out = str(tmp_path / "index")
    build.run(mixed, out, codebooks=codebooks, beam_options=ONE_WORKER)
    assert len(art.Artifact.load(out)) == 6


@pytest.mark.parametrize("spec", ["IVF16,PQ8x4", "OPQ8,IVF16,PQ8x4"])
def test_shard_lists_from_one_encoding_equal_adding_the_vectors(feature_tables, tmp_path, spec):
    """encode_shard adds the codes it encoded once (shared with ASMK's verification store);
    the lists must be those faiss builds from the vectors, with and without an OPQ rotation."""
    (table,) = tables.iter_batches(tables.snapshot(feature_tables["a"]).files[0], None, rows=1000)
    descriptors = descriptors_of(table)
    pca = pca_lib.fit_pca(descriptors, 16)
    reduced = np.ascontiguousarray(pca_lib.apply_pca(descriptors, pca), np.float32)
    trained = train_index(reduced, spec)
    shards.encode_shard([table], pca, trained, 0, str(tmp_path / "shard"))
    from_codes = faiss.read_index(str(tmp_path / "shard.ivf.faiss"))
    from_vectors = faiss.clone_index(trained)
    counts = table.column("num_features").to_numpy()
    from_vectors.add_with_ids(reduced, np.concatenate([art.feature_ids(i, c) for i, c in enumerate(counts)]))
    assert from_codes.ntotal == from_vectors.ntotal == len(reduced)
    for index in (from_codes, from_vectors):
        faiss.extract_index_ivf(index).nprobe = 4
    assert np.array_equal(from_codes.search(reduced[:50], 5)[1], from_vectors.search(reduced[:50], 5)[1])
