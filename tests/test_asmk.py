"""ASMK: the kernel against the reference `asmk` package, word assignment, and the pipeline
(fit --asmk-words, build --method asmk / both, search by either local method)."""

import json
import shutil

import faiss
import numpy as np
import pytest

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing import asmk
from delf_index.indexing.codebooks import auto_words
from delf_index.indexing.retrieval import Index, QueryError
from delf_index.indexing.versions import current_manifest
from delf_index.pipelines import build, evaluate, fit, search
from delf_index.pipelines import query as query_cli
from tests.conftest import ONE_WORKER


def build_ivf(words, images, signatures, num_images, num_words):
    """The inverted file of all entries (word, image, signature) built in memory, the
    reference for shards.write_asmk's streamed merge: CSR by word, images in order inside a
    word; IDF log(N / images of the word); image norms sqrt(sum of idf^2)."""
    order = np.lexsort((images, words))
    words, images, signatures = words[order], images[order].astype(np.int32), signatures[order]
    offsets = np.searchsorted(words, np.arange(num_words + 1)).astype(np.int64)
    counts = np.diff(offsets)
    idf = np.log(max(num_images, 1) / np.maximum(counts, 1)).astype(np.float32)
    norms = np.sqrt(np.bincount(images, weights=idf[words] ** 2, minlength=num_images)).astype(np.float32)
    ids, low_bits, id_offsets = asmk.encode_ids(images, offsets)
    return {
        "offsets": offsets,
        "images": images,  # what the three coded arrays hold
        "ids": ids,
        "low_bits": low_bits,
        "id_offsets": id_offsets,
        "signatures": signatures,
        "idf": idf,
        "norms": norms,
    }


def clustered(rng, images, per_image, dim, centres):
    """Descriptors [images * per_image, dim] (L2-normalised) around shared centres, so that
    images share words as real ones do; and the image of each descriptor."""
    picks = rng.integers(0, len(centres), size=images * per_image)
    x = centres[picks] + 0.3 * rng.normal(size=(len(picks), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(images), per_image)


def test_signatures_are_the_signs_of_the_summed_residuals():
    centroids = np.array([[0.0, 0.0, 0.0, 0.0], [10.0, 10.0, 10.0, 10.0]], np.float32)
    reduced = np.array([[1, -2, 3, -4], [2, 1, -1, -1], [11, 9, 10.5, 9.9]], np.float32)
    words, signatures = asmk.aggregate(reduced, np.array([[0], [0], [1]]), centroids)
    assert words.tolist() == [0, 1]
    # word 0: residual sum (3, -1, 2, -5) -> bits 1010; word 1: (1, -1, 0.5, -0.1) -> 1010
    np.testing.assert_array_equal(np.unpackbits(signatures, axis=1)[:, :4], [[1, 0, 1, 0], [1, 0, 1, 0]])
    # multiple assignment: a descriptor counts in each of its words
    words, _ = asmk.aggregate(reduced, np.array([[0, 1], [0, 1], [1, 0]]), centroids)
    assert words.tolist() == [0, 1]


@pytest.mark.parametrize("dim,alpha", [(40, 2.0), (32, 3.0)])
def test_scores_equal_the_reference_asmk_package(dim, alpha):
    """Our CSR inverted file and vectorised search against the authors' implementation
    (pip package `asmk`): the same scores for every image, with multiple assignment on the
    query side, with and without IDF, threshold 0; at the shipped settings (40-bit signatures,
    selectivity alpha 2) and the paper's alpha 3. The package packs bits in uint32 words and
    normalises Hamming distances by whole words (64 bits for 40); ours by the descriptor's
    bits (docs/index.md): the package's similarity is given that one normalisation, the rest
    (packing, distances, the kernel, IDF, the inverted file) stays the package's."""
    reference_kernel = pytest.importorskip("asmk.kernel")
    reference_ivf = pytest.importorskip("asmk.inverted_file")
    from asmk import functional, hamming

    rng = np.random.default_rng(0)
    num_words, num_images = 24, 30
    centres = rng.normal(size=(40, dim))
    database, owners = clustered(rng, num_images, 60, dim, centres)
    centroids = asmk.fit_words(database, num_words, seed=0)
    words_index = asmk.word_index(centroids)

    entries = [
        asmk.aggregate(database[owners == i], asmk.assign(words_index, database[owners == i], 1), centroids)
        for i in range(num_images)
    ]
    found = np.concatenate([w for w, _ in entries])
    ivf = build_ivf(
        found,
        np.concatenate([np.full(len(w), i) for i, (w, _) in enumerate(entries)]),
        np.concatenate([s for _, s in entries]),
        num_images,
        num_words,
    )
    assert np.all(np.diff(ivf["offsets"]) > 0), "every word used: the package gives unused words IDF 1"

    codebook = type("Codebook", (), {"centroids": centroids})()
    kernel = reference_kernel.ASMKKernel(codebook, binary=True)
    db_words = asmk.assign(words_index, database, 1)
    agg, agg_words, agg_images = kernel.aggregate(database, db_words, owners)
    packed_bits = agg.shape[1] * agg.dtype.itemsize * 8
    references = {}
    for use_idf in (True, False):
        references[use_idf] = reference_ivf.IVF.initialize_empty(codebook_size=num_words, use_idf=use_idf)
        references[use_idf].add(agg, agg_words, agg_images)

    def similarity(qvec, vecs, image_ids):
        distance = hamming.hamming_cdist_packed(qvec.reshape(1, -1), vecs).squeeze(0) * packed_bits / dim
        return functional.asmk_kernel(1 - 2 * distance, image_ids, alpha=alpha, similarity_threshold=0.0)

    for image in (0, 5, 9):  # a noisy copy of a database image: real matches, and the rest
        query = database[owners == image] + 0.01 * rng.normal(size=(60, dim)).astype(np.float32)
        assignments = asmk.assign(words_index, query, 3)
        q_agg, q_words = kernel.aggregate_image(query, assignments)
        for use_idf, reference in references.items():
            conf = {"alpha": alpha, "threshold": 0.0, "idf": use_idf}
            ours = asmk.search(ivf, *asmk.aggregate(query, assignments, centroids), conf)
            ranks, scores = reference.search(q_agg, q_words, similarity_func=similarity, topk=num_images)
            theirs = np.zeros(num_images)
            theirs[ranks] = scores
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
            assert np.count_nonzero(ours) > num_images // 2  # shared words: a comparison of substance
        with_idf = asmk.search(ivf, *asmk.aggregate(query, assignments, centroids))
        assert not np.allclose(with_idf, ours, rtol=1e-3)  # the knob changes the scores
        single = asmk.search(ivf, *asmk.aggregate(query, asmk.assign(words_index, query, 1), centroids))
        assert np.argmax(single) == image  # the copied image ranks first
    entries = np.bincount(ivf["images"], minlength=num_images)  # counted again, in blocks of 5 words
    fresh = {key: value for key, value in ivf.items() if key != "unweighted_norms"}
    np.testing.assert_array_equal(asmk.unweighted_norms(fresh, block_words=5), np.sqrt(entries).astype(np.float32))


def test_an_image_is_most_similar_to_itself():
    rng = np.random.default_rng(1)
    database, owners = clustered(rng, 20, 80, 40, rng.normal(size=(30, 40)))
    centroids = asmk.fit_words(database, 32)
    index = asmk.word_index(centroids)
    parts = [
        asmk.aggregate(database[owners == i], asmk.assign(index, database[owners == i], 1), centroids)
        for i in range(20)
    ]
    ivf = build_ivf(
        np.concatenate([w for w, _ in parts]),
        np.concatenate([np.full(len(w), i) for i, (w, _) in enumerate(parts)]),
        np.concatenate([s for _, s in parts]),
        20,
        32,
    )
    for i in (0, 7, 19):
        scores = asmk.search(ivf, *parts[i])
        assert np.argmax(scores) == i and scores[i] == pytest.approx(1.0, abs=1e-6)
        assert np.all(scores <= 1.0 + 1e-6)
    live = np.ones(20, bool)
    live[7] = False
    assert asmk.search(ivf, *parts[7], live=live)[7] == 0


def test_the_streamed_merge_writes_the_inverted_file_built_in_memory(tmp_path):
    """write_asmk merges sorted, memory-mapped shards (and a previous version) in word blocks;
    the files must equal asmk.build_ivf of all entries at once, for any block size."""
    from delf_index.indexing import shards

    rng = np.random.default_rng(3)
    num_words, num_images, bytes_ = 50, 40, 5
    words = rng.integers(0, num_words, 900)
    images = np.sort(rng.integers(0, num_images, 900))  # shards hold consecutive image ids
    keep = np.unique(np.stack([words, images], 1), axis=0, return_index=True)[1]  # a word once per image
    words, images = words[keep], images[keep]
    signatures = rng.integers(0, 256, (len(words), bytes_), dtype=np.uint8)
    expected = build_ivf(words, images, signatures, num_images, num_words)
    assigner = type(
        "Words",
        (),
        {
            "centroids": np.zeros((num_words, 8), np.float32),
            "index": asmk.word_index(np.zeros((num_words, 8), np.float32)),
        },
    )()

    def write_shard(prefix, rows):
        order = np.lexsort((images[rows], words[rows]))
        files = shards.shard_files(prefix)
        for suffix, array in zip(shards.ASMK_SHARD_SUFFIXES, (words[rows], images[rows], signatures[rows])):
            np.save(files[suffix], array[order].astype(np.int32) if array.ndim == 1 else array[order])

    bounds = [0, 10, 25, 33, num_images]  # images [0, 10) in a previous version, then three shards
    previous = tmp_path / "previous"
    previous.mkdir()
    first = np.flatnonzero(images < bounds[1])
    old = build_ivf(words[first], images[first], signatures[first], num_images, num_words)
    for key in asmk.LIST_KEYS:
        np.save(previous / f"asmk_{key}.npy", old[key])
    prefixes = []
    for lo, hi in zip(bounds[1:-1], bounds[2:]):
        prefixes.append(str(tmp_path / f"shard-{lo}"))
        write_shard(prefixes[-1], np.flatnonzero((images >= lo) & (images < hi)))
    for block, earlier in ((3, previous), (4096, previous), (7, previous)):
        out = tmp_path / f"out-{block}"
        out.mkdir()
        shards.write_asmk(prefixes, str(earlier), str(out), num_images, assigner, block_words=block)
        assert not (out / "asmk_ids.raw").exists()
        for key in asmk.LIST_KEYS:
            written = np.load(out / f"asmk_{key}.npy")
            assert written.dtype == expected[key].dtype, key
            if key in ("idf", "norms"):  # sums in another order
                np.testing.assert_allclose(written, expected[key], rtol=1e-6, err_msg=key)
            else:  # bit for bit, padding included
                np.testing.assert_array_equal(written, expected[key], err_msg=key)
        lists = asmk.open_lists(str(out))
        np.testing.assert_array_equal(asmk.entry_images(lists), expected["images"])
    # a version of the unreleased formats 3 to 5 (no coded ids) is refused, naming the fix
    unreleased = tmp_path / "format-3"
    unreleased.mkdir()
    for key in ("offsets", "signatures", "idf", "norms"):
        np.save(unreleased / f"asmk_{key}.npy", old[key])
    with pytest.raises(UserError, match="unreleased format .*rebuild the index"):
        asmk.open_lists(str(unreleased))
    # damaged arrays are refused before the compiled scan trusts them
    damaged = tmp_path / "out-3"
    damages = [("offsets", expected["offsets"][:-1]), ("id_offsets", expected["id_offsets"][::-1])]
    damages += [("ids", expected["ids"][:-1]), ("low_bits", expected["low_bits"] + 32)]
    damages.append(("id_offsets", expected["id_offsets"] - 1))
    damages.append(("low_bits", np.where(np.diff(expected["offsets"]) > 0, 30, 0).astype(np.uint8)))  # parts too short
    damages.append(("ids", expected["ids"].view(np.uint8)[: len(expected["ids"])]))  # the right length, bytes
    damages.append(("id_offsets", expected["id_offsets"].astype(np.float64)))
    for key, array in damages:
        np.save(damaged / f"asmk_{key}.npy", array)
        with pytest.raises(UserError, match="damaged ASMK inverted file"):
            asmk.open_lists(str(damaged))
        np.save(damaged / f"asmk_{key}.npy", expected[key])
    # ids of the right sizes but wrong bits (all set, none set) decode to wrong ids, never
    # outside the arrays (check_lists passes them: only their bits are wrong)
    for bits in (np.uint64(2**64 - 1), np.uint64(0)):
        lists = {**expected, "ids": np.full_like(expected["ids"], bits)}
        asmk.check_lists(lists, "memory")
        assert len(asmk.entry_images(lists)) == len(expected["images"])
        signatures = expected["signatures"][:2]
        for idf, threads in ((True, 1), (True, 2), (False, 1)):
            scores = asmk.search(lists, np.arange(num_words)[[3, -1]], signatures, {"threads": threads, "idf": idf})
            assert scores.shape == (num_images,) and np.isfinite(scores).all()


def test_image_ids_are_coded_in_elias_fano_and_decoded_exactly():
    # words: empty; 3, 4, 9, 14 (one low bit each: 1 0 1 0 at bits 0-3; high parts 1 2 4 7,
    # + entry: bits 1 3 6 10 after the low bits, 5 7 10 14); id 0 alone (no low bit, bit 15);
    # 5 and the largest id (30 low bits each from bit 16, 63 bits in all)
    # and the largest id alone (31 low bits)
    ids = np.array([3, 4, 9, 14, 0, 5, 2**31 - 1, 2**31 - 1], np.int32)
    offsets = np.array([0, 0, 4, 5, 7, 8], np.int64)
    coded, low_bits, id_offsets = asmk.encode_ids(ids, offsets)
    assert low_bits.tolist() == [0, 1, 0, 30, 31]  # 30: floor(log2(2**31 / 2))
    assert id_offsets.tolist() == [0, 0, 15, 16, 79, 79 + 31 + 1] and len(coded) == 2 + 1  # + padding
    assert int(coded[0]) & 0xFFFF == 0b1100010010100101 and coded[-1] == 0
    lists = {"ids": coded, "low_bits": low_bits, "id_offsets": id_offsets, "offsets": offsets}
    np.testing.assert_array_equal(asmk.entry_images(lists), ids)
    np.testing.assert_array_equal(asmk.entry_images(lists, 2, 4), ids[4:7])
    # dense and sparse words: parts across uint64 boundaries, high parts over many uint64
    rng = np.random.default_rng(0)
    sizes = [(10**6, 3), (5000, 4999), (10**5, 700)]
    lists = [np.sort(rng.choice(universe, size, replace=False)) for universe, size in sizes] + [np.array([76])]
    ids, offsets = np.concatenate(lists).astype(np.int32), np.cumsum([0] + [len(x) for x in lists])
    coded = dict(zip(("ids", "low_bits", "id_offsets"), asmk.encode_ids(ids, offsets)), offsets=offsets)
    np.testing.assert_array_equal(asmk.entry_images(coded), ids)
    assert coded["low_bits"].tolist() == [18, 0, 7, 6]
    with pytest.raises(ValueError, match="ascend"):
        asmk.encode_ids(np.array([3, 3], np.int32), np.array([0, 2], np.int64))
    with pytest.raises(ValueError, match="ascend"):
        asmk.encode_ids(np.array([3, 2], np.int32), np.array([0, 2], np.int64))
    with pytest.raises(ValueError, match=">= 0"):
        asmk.encode_ids(np.array([-1], np.int32), np.array([0, 1], np.int64))


def scores_written_out(ivf, query_words, query, bits, num_images, alpha):
    """ASMK's scores computed entry by entry from the uncoded lists (threshold 0)."""
    expected = np.zeros(num_images)
    for word, code in zip(query_words, query):
        for entry in range(ivf["offsets"][word], ivf["offsets"][word + 1]):
            similarity = 1 - 2 * np.count_nonzero(np.unpackbits(code ^ ivf["signatures"][entry])) / bits
            expected[ivf["images"][entry]] += ivf["idf"][word] ** 2 * max(similarity, 0) ** alpha * (similarity >= 0)
    return expected / np.maximum(ivf["norms"] * np.sqrt((ivf["idf"][query_words] ** 2).sum()), 1e-12)


@pytest.mark.parametrize("bits", [8, 32, 40, 64, 72, 128])
def test_the_compiled_scan_equals_the_kernel_written_out(bits):
    """asmk.search (compiled, coded ids, signatures of one or more uint64 words, read with
    one 8-byte load or byte by byte at the end of the file, any number of threads) against
    the formula computed entry by entry from uncoded lists."""
    rng = np.random.default_rng(bits)
    num_words, num_images = 30, 20_000  # ~100 entries per word: many differences over 255
    entries = {(int(w), int(i)) for w, i in zip(rng.integers(0, num_words, 3000), rng.integers(0, num_images, 3000))}
    words, images = np.array(sorted(entries)).T
    signatures = np.packbits(rng.random((len(words), bits)) < 0.5, axis=1)
    ivf = build_ivf(words, images, signatures, num_images, num_words)
    assert np.diff(ivf["id_offsets"]).min() > 3 * 64  # low bits across uint64, high parts over several
    query_words = np.array([0, 3, 4, 17, 29])  # 29: the last entries, whose load would pass the end
    query = np.packbits(rng.random((5, bits)) < 0.5, axis=1)
    for alpha in (asmk.default_conf["alpha"], 3.0):  # the default, the paper's
        expected = scores_written_out(ivf, query_words, query, bits, num_images, alpha)
        for threads in (1, 2, 3):
            scores = asmk.search(ivf, query_words, query, {"threads": threads, "alpha": alpha}, bits=bits)
            np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
        assert np.count_nonzero(expected) > 100


@pytest.mark.parametrize("bits,count", [(8, 3), (40, 1), (16, 4)])
def test_the_compiled_scan_of_a_file_under_8_bytes(bits, count):
    """Inverted files of fewer than 8 bytes of signatures: no entry can be read with one
    8-byte load."""
    rng = np.random.default_rng(count)
    words, images = np.zeros(count, np.int64), np.arange(count)
    signatures = np.packbits(rng.random((count, bits)) < 0.5, axis=1)
    ivf = build_ivf(words, images, signatures, count + 1, 1)  # an image without the word: idf > 0
    query = signatures[:1] ^ np.uint8(1)  # one bit from the first entry
    scores = asmk.search(ivf, np.array([0]), query, bits=bits)
    expected = scores_written_out(ivf, [0], query, bits, count + 1, asmk.default_conf["alpha"])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
    assert scores[0] > 0


def test_assignment_searches_float32_graphs_of_earlier_indexes_at_the_given_ef():
    rng = np.random.default_rng(3)
    centroids = rng.normal(size=(3000, 40)).astype(np.float32)
    queries = rng.normal(size=(500, 40)).astype(np.float32)
    graph = faiss.IndexHNSWFlat(40, 32)  # what asmk_words.faiss held before float16 words
    graph.add(centroids)
    found = asmk.assign(graph, queries, 5, ef=64)
    params = faiss.SearchParametersHNSW(efSearch=64)
    np.testing.assert_array_equal(found, graph.search(queries, 5, params=params)[1])
    assert not np.array_equal(found, graph.search(queries, 5)[1])  # faiss's default ef differs


def test_hnsw_assignment_finds_the_exact_nearest_word_almost_always():
    rng = np.random.default_rng(2)
    centroids = rng.normal(size=(4000, 40)).astype(np.float32)
    queries = (centroids[rng.integers(0, 4000, 3000)] + 0.5 * rng.normal(size=(3000, 40))).astype(np.float32)
    exact = asmk.assign(asmk.word_index(centroids), queries, 1)[:, 0]
    graph = asmk.word_index(centroids, {"hnsw_above": 1000})
    assert "HNSW" in type(graph).__name__
    approximate = asmk.assign(graph, queries, 1)[:, 0]
    assert np.mean(approximate == exact) > 0.95


def test_automatic_word_counts():
    assert auto_words(186_000) == 4096  # landmarks-dev
    assert auto_words(1_000) == 1024 and auto_words(10**9) == 65536
    assert auto_words(100_000_000) == 65536


@pytest.fixture(scope="module")
def asmk_codebooks(evaluated, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("asmk") / "codebooks")
    fit.run(str(evaluated[0] / "features"), out, {"asmk_words": 128}, beam_options=ONE_WORKER)
    return out


def test_build_both_answers_by_either_method(evaluated, asmk_codebooks, corpus, tmp_path, capsys):
    features = str(evaluated[0] / "features")
    out = str(tmp_path / "both")
    manifest = build.run(features, out, codebooks=asmk_codebooks, beam_options=ONE_WORKER, method="both")
    assert manifest["method"] == "both" and "asmk_signatures.npy" in manifest["files"]
    # format 7 with ASMK or without (dead.npy, which earlier versions would miss)
    assert (manifest["format_version"], current_manifest(str(evaluated[0] / "index"))["format_version"]) == (7, 7)
    artifact = art.Artifact.load(out)
    assert artifact.index is not None and len(artifact.asmk["offsets"]) == 129
    assert len(artifact.codes) == manifest["counts"]["descriptors"]
    query = str(corpus / "images" / "rocket-zoom.jpg")
    local = {}
    for method in ("knn", "asmk", "both"):
        index = Index(artifact, {"local_method": method})
        assert index.method == method
        results = index.search(query, top_k=3, exclude=["rocket-zoom.jpg"])
        assert results[0].image_id.startswith("rocket") and results[0].inliers >= 12, method
        assert results[0].query_xy.shape == (results[0].inliers, 2)
        unverified = Index(artifact, {"local_method": method, "use_verification": False})
        local[method] = {r.image_id: r.local_score for r in unverified.search(query, top_k=None)}
    # both fused: the mean of the votes and the ASMK similarity (equal weights: ratio 1)
    for image_id, score in local["both"].items():
        assert score == pytest.approx(0.5 * (local["knn"][image_id] + local["asmk"][image_id]), abs=1e-6)
    # the query's own image, by ASMK alone with one word per descriptor: similarity 1
    itself = Index(artifact, {"local_method": "asmk", "use_global": False, "use_verification": False})
    itself.asmk_conf["query_assignments"] = 1
    best = itself.search(query, top_k=1)[0]
    assert best.image_id == "rocket-zoom.jpg" and best.local_score == pytest.approx(1.0, abs=1e-3)
    # the command line chooses the method of an index that has both
    for method in ("knn", "asmk"):
        capsys.readouterr()
        assert query_cli.main([query, "--index", out, "--json", "--local-method", method]) == 0
        answer = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert answer["results"][0]["image_id"] == "rocket-zoom.jpg", method


def test_an_asmk_index_needs_words_and_answers_only_asmk(evaluated, asmk_codebooks, corpus, tmp_path):
    features = str(evaluated[0] / "features")
    plain = str(evaluated[0] / "codebooks")  # fitted without words
    with pytest.raises(UserError, match="--asmk-words"):
        build.run(features, str(tmp_path / "none"), codebooks=plain, beam_options=ONE_WORKER, method="asmk")
    out = str(tmp_path / "asmk")
    manifest = build.run(features, out, codebooks=asmk_codebooks, beam_options=ONE_WORKER, method="asmk")
    assert "index.faiss" not in manifest["files"] and manifest["method"] == "asmk"
    index = Index.load(out)
    assert index.method == "asmk" and index.artifact.index is None
    results = index.search(str(corpus / "images" / "coffee-view.jpg"), top_k=2, exclude=["coffee-view.jpg"])
    assert results[0].image_id.startswith("coffee") and results[0].inliers >= 12
    for method in ("knn", "both"):
        with pytest.raises(QueryError, match="no knn lists"):
            Index(index.artifact, {"local_method": method})
    with pytest.raises(QueryError, match="no asmk lists"):
        Index.load(str(evaluated[0] / "index"), conf={"local_method": "asmk"})
    # a search job refuses before it starts, not in each worker
    with pytest.raises(QueryError, match="no knn lists"):
        search.run(features, out, str(tmp_path / "s"), conf={"query": {"local_method": "knn"}})
    assert not (tmp_path / "s").exists()
    # remove an image: an append makes its row dead in ASMK's ranking too, and keeps the method
    features = str(tmp_path / "features")  # the takedown is recorded in the table: a copy of it
    shutil.copytree(evaluated[0] / "features", features)
    with pytest.raises(UserError, match="--append keeps the index's local method"):
        build.run(features, out, append=True, remove=["coffee-view.jpg"], beam_options=ONE_WORKER, method="knn")
    removed = build.run(features, out, append=True, remove=["coffee-view.jpg"], beam_options=ONE_WORKER)
    assert removed["method"] == "asmk"
    results = Index.load(out).search(str(corpus / "images" / "coffee-view.jpg"), top_k=None)
    assert "coffee-view.jpg" not in [r.image_id for r in results]
    # a rebuild in place with the index's own codebooks (update's compaction) keeps ASMK
    rebuilt = build.run(features, out, codebooks=out, beam_options=ONE_WORKER)
    assert rebuilt["method"] == "asmk" and rebuilt["counts"]["dead"] == 0


def test_evaluate_scores_both_methods_side_by_side(evaluated, corpus, tmp_path):
    """evaluate --method both: words fitted, one index with both, the stages of each method
    and of both fused scored; the ASMK rows are the ASMK index's own rankings."""
    work = tmp_path / "work"
    shutil.copytree(evaluated[0], work)
    summary = evaluate.run(
        str(corpus / "images"), str(work), groups=str(corpus / "groups.csv"), conf={"method": "both"}
    )
    assert current_manifest(str(work / "index"))["method"] == "both"
    metrics = json.loads((work / "eval" / "metrics.json").read_text())["scores"]
    assert "ASMK local only" in metrics and "ASMK global only" not in metrics  # global: the same as k-NN's
    assert summary["ASMK mAP"] == round(metrics["ASMK default"]["all"]["mAP"], 4) > 0.8
    assert summary["k-NN + ASMK mAP"] == round(metrics["k-NN + ASMK default"]["all"]["mAP"], 4) > 0.8
    assert "k-NN + ASMK local only" in metrics and "ASMK + view synthesis" not in metrics  # synthesis: k-NN's
    report = (work / "eval" / "report.md").read_text()
    assert "| ASMK fused + verification |" in report and "| k-NN + ASMK fused + verification |" in report
    # back to k-NN voting alone: the codebooks (with words k-NN does not use) are kept, the
    # index is built again with the k-NN lists only
    fitted = (work / "codebooks" / "codebooks.json").read_text()
    evaluate.run(
        str(corpus / "images"), str(work), groups=str(corpus / "groups.csv"), conf={"method": "knn", "ablation": False}
    )
    assert (work / "codebooks" / "codebooks.json").read_text() == fitted
    assert current_manifest(str(work / "index"))["method"] == "knn"


def test_similarity_is_scaled_by_the_descriptor_bits_and_missing_words_are_ignored():
    """12-d signatures take 2 bytes: 6 differing bits are similarity 0 (1 - 2 * 6 / 12), not
    0.25 as 16 padded bits would make it. A word faiss did not find (-1) counts nowhere."""
    database = np.packbits(np.ones((1, 12), bool), axis=1)
    query = np.packbits(np.r_[np.ones(6, bool), np.zeros(6, bool)][None], axis=1)
    ivf = build_ivf(np.array([3]), np.array([0]), database, 2, 4)  # 2 images: idf log 2
    assert asmk.search(ivf, np.array([3]), query, bits=12)[0] == 0.0
    assert asmk.search(ivf, np.array([3]), query)[0] > 0  # the padded scale: what bits= corrects
    centroids = np.eye(4, 12, dtype=np.float32)
    index = asmk.word_index(centroids)
    assert asmk.assign(index, centroids, 6).shape == (4, 4)  # k capped at the words there are
    words, _ = asmk.aggregate(centroids[:2], np.array([[0, -1], [1, -1]]), centroids)
    assert words.tolist() == [0, 1]
