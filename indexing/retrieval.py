"""The query module: which indexed images show the same place or object as this one?

    from delf_index import Index

    index = Index.load("gs://bucket/index")          # or a local folder
    for result in index.search("photo.jpg", top_k=10):
        print(result.image_id, result.inliers, result.score)

Ranking, every stage switchable so that its contribution can be measured:

1. **global**: cosine similarity of GeM global descriptors, against every indexed image (for
   the best `top_k`, only against those that can rank: `_global_scores`);
2. **local**, by one of two methods (`local_method`; an index holds one or both):
   **k-NN voting** (DELF): each query descriptor's k nearest neighbours in the PQ index vote
   for their images, weighted by similarity (each query descriptor counts once per image);
   or **ASMK** (indexing/asmk.py): the query's descriptors aggregated per visual word,
   compared with each image's aggregated binary signatures through an inverted file;
3. **fusion**: ``global + local_weight * votes`` or ``global + asmk_weight * asmk`` (the DELF
   paper fused with a global descriptor too; DELG does it in one network);
4. **verification** of the `shortlist` best: one-to-one correspondences (from the k-NN
   results; with ASMK, from the k nearest neighbours of each query descriptor among the
   shortlisted images' descriptors, decoded from their compact codes: the same rule over an
   exact search of the shortlist), RANSAC affine (indexing/verify.py); final order: images with at
   least `min_inliers` inliers first by inliers, then everything by the fused score.

`Index` is safe to share between threads: searching only reads the faiss indexes, the
extractor's onnxruntime session and the geometry, and takes its search parameters per call.
"""

import dataclasses
import logging
import threading
import time

import faiss
import numpy as np

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing import asmk, expansion, verify
from delf_index.indexing import pca as pca_lib
from delf_index.indexing import synthesis as synthesis_lib
from delf_index.runtime.conf import resolve_conf
from delf_index.runtime.extractor import Extractor, model_of
from delf_index.runtime.extractor import default_conf as extractor_conf
from delf_index.runtime.features import Features
from delf_index.runtime.images import prepare_for_extraction

log = logging.getLogger(__name__)

default_conf = {
    "use_global": True,  # rank by the global descriptor
    "use_local": True,  # rank by the local descriptors (k-NN votes or ASMK, `local_method`)
    "use_verification": True,  # re-rank the shortlist by RANSAC inliers
    # "knn", "asmk", or "both" (their scores averaged, for an index built with both; verified
    # with k-NN's correspondences); None: the index's (k-NN voting when it has its lists)
    "local_method": None,
    "knn": 20,  # neighbours per query descriptor (votes and correspondences)
    "nprobe": 32,  # coarse cells visited per query descriptor
    "vote_floor": 0.5,  # similarity below which a neighbour does not vote; votes weigh (sim - floor)
    "local_weight": 10.0,  # weight of the normalised local votes against the global similarity
    # weight of the ASMK similarity (in [0, 1]) against the global similarity; at 1 the fused
    # ranking was the global one on landmarks-dev, 10 used ASMK and verified +0.002 on 2 seeds
    "asmk_weight": 10.0,
    "asmk": {},  # overrides of indexing.asmk.default_conf (alpha, threshold, query_assignments, ...)
    "shortlist": 100,  # images verified geometrically
    "min_inliers": 12,  # fewer inliers do not count as a verified match
    "ransac": {},  # overrides of indexing.verify.default_conf (threshold, trials, ...)
    # query expansion after verification (indexing/expansion.py), then a second verification round
    "expansion": True,  # alpha-QE of the global descriptor with the verified results
    "qe_min_inliers": 20,  # inliers that make a verified result expand the query
    "qe_top": 5,  # verified results (most inliers first) that expand it
    "qe_alpha": 3.0,  # a result's weight: its global similarity ** alpha
    # verified results vote for their match-graph neighbours; None: when the index holds a
    # match graph (`delf-index match --augment`)
    "graph_expansion": None,
    "graph_weight": 1.0,  # a neighbour of every expanding result gains this much fused score
    # rank against the neighbour-augmented global descriptors; None: when the index holds them
    "use_dba": None,
    # view synthesis (indexing/synthesis.py): a query whose best result verifies with fewer
    # than `synthesis_min_inliers`, and whose ranking shows evidence of a match (below), is
    # extracted again under the views of these stages, in order, until one verifies; a
    # view's result counts from as many. Rotations only: the
    # tilt stages added nothing on the extreme-viewpoint set at 7 to 20 more views per query
    # that failed (benchmarks/README.md, "View synthesis"); [] turns synthesis off
    "synthesis_stages": ["rotations"],
    # None: min_inliers, synthesis exactly where nothing verified (20 instead of 12: 0.688
    # against 0.708 on the extreme-viewpoint set)
    "synthesis_min_inliers": None,
    "synthesis_features": 500,  # features kept per synthesized view (the strongest)
    # pyramid levels a view is extracted at (None: the query's). Up to 1.41 (without 2.0, half
    # the pyramid's pixels) the extreme-viewpoint set and the far pairs ranked as well, but a
    # WxBS pair that a view verifies with 12 inliers at every level fell to 11 on one seed
    "synthesis_scales": None,
    # the evidence that makes a query that verified nothing want views (`Index.wants_views`),
    # chosen on landmarks-dev and the sets built from it (benchmarks/README.md): its best
    # partial fit turned by this many degrees (1 % of landmarks-dev's verified pairs of a
    # place turn so far) ...
    "synthesis_turn": 30.0,
    # ... or a candidate this similar by the global descriptor ...
    "synthesis_global": 0.69,
    # ... and a candidate with this local score (k-NN votes: the mean over the query's
    # descriptors of their best similarity above vote_floor; measured for k-NN voting only)
    "synthesis_votes": 0.045,
}

# Named configurations for evaluate's ablation: each stage on its own, from the plain ranking
# (no expansion, no synthesis) up; evaluate adds "default", the settings given.
PLAIN = {"expansion": False, "graph_expansion": False, "use_dba": False, "synthesis_stages": []}
presets = {
    "global only": {**PLAIN, "use_local": False, "use_verification": False},
    "local voting only": {**PLAIN, "use_global": False, "use_verification": False},
    "fused": {**PLAIN, "use_verification": False},
    "fused + verification": PLAIN,
    "+ alpha-QE": {**PLAIN, "expansion": True},
    "+ view synthesis": {**PLAIN, "synthesis_stages": list(default_conf["synthesis_stages"])},
}
# the stages that need a match graph (an augmented index)
expansion_presets = {
    "+ alpha-QE + graph": {**PLAIN, "expansion": True, "graph_expansion": True},
    "+ DBA": {**PLAIN, "use_dba": True},
    "+ DBA + alpha-QE + graph": {**PLAIN, "use_dba": True, "expansion": True, "graph_expansion": True},
}


@dataclasses.dataclass
class Result:
    image_id: str
    uri: str
    label: str
    score: float  # fused score (global + weighted votes)
    global_score: float
    local_score: float
    inliers: int  # verified inliers (0 when not verified or under min_inliers)
    query_xy: np.ndarray = None  # [inliers, 2] inlier keypoints in the query (x, y)
    match_xy: np.ndarray = None  # [inliers, 2] the corresponding keypoints in this image
    row: int = -1  # int id of the image in the index

    def as_dict(self):
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("query_xy", "match_xy")}
        out["score"], out["global_score"], out["local_score"] = (
            round(float(out[k]), 6) for k in ("score", "global_score", "local_score")
        )
        return out


class QueryError(UserError):
    """A query that cannot be answered as asked (unreadable image, wrong model, ...)."""


def local_method(requested, has):
    """The local ranking queries use: `requested` ("knn", "asmk", "both", or None: k-NN voting
    when the index has its lists, else ASMK), checked against the lists the index `has`
    ({method: bool}: Artifact's, or the manifest's files, so a job can refuse before it starts)."""
    method = requested or ("knn" if has["knn"] else "asmk")
    if method not in ("knn", "asmk", "both"):
        raise UserError(f"local_method {method!r}: use knn, asmk or both")
    missing = [m for m in ("knn", "asmk") if method in (m, "both") and not has[m]]
    if missing:
        built = [m for m, present in has.items() if present]
        raise QueryError(
            f"local_method {method}: the index has no {missing[0]} lists (it has {built or 'none'}); "
            "rebuild it with build --method both to query by either or both"
        )
    return method


def verified_first(order, fused, inliers):
    """The final ranking: the verified rows (inliers > 0) by inliers, then fused score, then
    row; then the rest of `order` (best_rows' rows, by fused score). Equal to a stable sort of
    every rankable row by (-inliers, -fused), without sorting them all."""
    verified = np.flatnonzero(inliers > 0)
    verified = verified[np.lexsort((verified, -fused[verified], -inliers[verified]))]
    return np.concatenate([verified, order[inliers[order] == 0]])


def best_rows(scores, rankable, count):
    """The `count` rankable rows of highest score, best first, ties in row order: the start of
    a stable argsort of every row, without sorting them all (at 100,000 images the full sort
    took 8 ms of a 50 ms search)."""
    scores = np.where(rankable, scores, -np.inf)
    count = min(int(count), int(rankable.sum()))
    if count <= 0:
        return np.zeros(0, np.int64)
    if count < len(scores):
        kth = np.partition(scores, len(scores) - count)[len(scores) - count]  # the count-th highest
        above, tied = np.flatnonzero(scores > kth), np.flatnonzero(scores == kth)
        rows = np.concatenate([above, tied[: count - len(above)]])
    else:
        rows = np.arange(len(scores))
    return rows[np.argsort(-scores[rows], kind="stable")]


# rows first scored by the global descriptor when the best fused scores are asked for
# (_global_scores): a few times the shortlist, and a small heap for faiss
GLOBAL_TOP = 1000


class Index:
    def __init__(self, artifact, conf=None, model=None, threads=None, extractor=None):
        self.conf = resolve_conf(conf, default_conf, "query")
        augmented = {"graph_expansion": artifact.graph is not None, "use_dba": artifact.dba_index is not None}
        for key, held in augmented.items():  # None: whenever the index holds what the stage needs
            self.conf[key] = held if self.conf[key] is None else bool(self.conf[key])
        if self.conf["synthesis_min_inliers"] is None:  # synthesis exactly where nothing verified
            self.conf["synthesis_min_inliers"] = self.conf["min_inliers"]
        self.ransac_conf = {**verify.default_conf, **self.conf["ransac"]}
        self.asmk_conf = {**asmk.default_conf, **self.conf["asmk"]}
        self.artifact = artifact
        self.method = local_method(
            self.conf["local_method"], {"knn": artifact.index is not None, "asmk": artifact.asmk is not None}
        )
        self._model, self._threads, self._extractor = model, threads, extractor
        self._view_extractor = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, uri, model=None, conf=None, verify_files=True, threads=None):
        """Load an artifact; queries given as images are extracted with `model` (default: the
        shipped model the index was built from), which must be the model the index was built
        from."""
        return cls(art.Artifact.load(uri, verify=verify_files), conf, model, threads)

    @property
    def extractor(self):
        """The extractor for image queries, created on first use with the index's settings."""
        with self._lock:
            if self._extractor is None:
                settings = self.artifact.manifest.get("extractor", {})
                settings = {k: v for k, v in settings.items() if k in extractor_conf}
                settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
                model = model_of(self.artifact.fingerprint, self._model)  # by default the index's own
                extractor = Extractor(model, settings, threads=self._threads)
                if extractor.fingerprint != self.artifact.fingerprint:
                    raise QueryError(
                        f"the index was built from model {self.artifact.fingerprint[:12]}, the query model is "
                        f"{extractor.fingerprint[:12]}: pass the index's model (--model)"
                    )
                self._extractor = extractor
            return self._extractor

    @property
    def view_extractor(self):
        """The extractor of synthesized views: the query's network and settings, at the pyramid
        levels of `synthesis_scales`, keeping `synthesis_features` per view."""
        extractor = self.extractor
        with self._lock:
            if self._view_extractor is None:
                conf = {**extractor.conf, "max_features": self.conf["synthesis_features"]}
                if self.conf["synthesis_scales"] is not None:
                    conf["scales"] = tuple(self.conf["synthesis_scales"])
                self._view_extractor = Extractor(conf=conf, engine=extractor.engine)
            return self._view_extractor

    def __len__(self):
        return len(self.artifact)

    # -- input ----------------------------------------------------------------------------
    def query_features(self, query):
        """Features of a query: Features as they are, else an image (a path or URI, encoded
        bytes or a uint8 RGB array) decoded and shrunk as extract does with database images,
        or the (pixels, original size) of `query_pixels`."""
        if isinstance(query, Features):
            return query
        pixels = query if isinstance(query, tuple) else self.query_pixels(query)
        try:
            return self.extractor.extract_batch([pixels[0]], original_sizes=[pixels[1]])[0]
        except (UserError, OSError) as e:
            if isinstance(e, QueryError):
                raise
            raise QueryError(f"cannot extract the query: {e}") from e

    # -- search ---------------------------------------------------------------------------
    def search(self, query, top_k=10, exclude=(), with_matches=True, timings=None, prepared=None, image=None,
               synthesize=None):  # fmt: skip
        """Ranked results (best first) for one query; `exclude`: image_ids to leave out (the
        query itself in leave-one-out evaluation). `top_k=None` ranks the whole index.
        A `timings` dict receives the seconds spent extracting, searching and verifying, and
        what view synthesis did (`synthesis_views`, `synthesis_s`) or wanted
        (`synthesis_wanted`, `synthesis_promise`: `wants_views`).
        `prepared`: this query's `prepare(features)`, when several rankings of the same query
        with the same local method share it (the evaluation's ablation). A query whose best
        result verifies with fewer than `synthesis_min_inliers`, and whose ranking shows
        evidence that its match is there (`wants_views`), is extracted again under the views
        of `synthesis_stages` (indexing/synthesis.py), stage by stage; `synthesize` False: never
        (a batch decides later, within its budget), True: without that evidence. That needs
        its pixels: a query given as Features names them with `image` (a path, bytes or array)."""
        clock = time.perf_counter()
        pixels = None if isinstance(query, Features) else self.query_pixels(query)
        features = query if pixels is None else self.query_features(pixels)
        extracted = time.perf_counter()
        if len(self.artifact) == 0:
            return []
        ranked = self._rank(features, top_k, exclude, prepared, timings)
        synthesis = self._synthesize(ranked, features, pixels, image, top_k, exclude, synthesize)
        if timings is not None:
            timings.update(extract_s=extracted - clock, **{f"synthesis_{k}": v for k, v in synthesis.items()})
        order = ranked["order"] if top_k is None else ranked["order"][:top_k]
        results = []
        for row in order:
            qxy, dxy = ranked["matches"].get(row, (None, None)) if with_matches else (None, None)
            results.append(
                Result(
                    image_id=self.artifact.image_ids[row],
                    uri=self.artifact.uris[row],
                    label=self.artifact.labels[row],
                    score=float(ranked["fused"][row]),
                    global_score=float(ranked["global"][row]),
                    local_score=float(ranked["local"][row]),
                    inliers=int(ranked["inliers"][row]),
                    query_xy=qxy,
                    match_xy=dxy,
                    row=int(row),
                )
            )
        return results

    def _synthesize(self, ranked, features, pixels, image, top_k, exclude, synthesize=None):
        """View synthesis, MODS-style: where the best verified result of `ranked` has fewer than
        `synthesis_min_inliers` and the ranking wants views (`wants_views`; `synthesize`
        overrides that), the stages' views of the query are each ranked and verified on their
        own (in the query's frame, with its global descriptor and scores), stage after stage
        while nothing verifies, and a row a view verifies with at least
        `synthesis_min_inliers` takes that view's inliers if they are more. Each view alone,
        not their union: the union's many unmatched features drowned RANSAC's inlier ratio and
        lost matches the plain query had (landmarks-dev 0.951 -> 0.911). Updates `ranked`;
        returns {"wanted", "promise", "views", "s"}."""
        conf, start = self.conf, time.perf_counter()
        wanted, promise = self.wants_views(ranked)
        done = {"wanted": wanted, "promise": promise, "views": 0, "s": 0.0}
        if not (synthesize or (synthesize is None and wanted)):
            return done
        for stage in conf["synthesis_stages"] if conf["use_verification"] else ():
            if ranked["inliers"].max(initial=0) >= conf["synthesis_min_inliers"]:
                break
            if pixels is None and image is not None:
                try:
                    pixels = self.query_pixels(image)
                except QueryError as e:  # the query's features stand: ranked without synthesis
                    log.warning("view synthesis skipped: %s", e)
            if pixels is None:
                break
            views = synthesis_lib.synthesized(self.view_extractor, pixels[0], synthesis_lib.STAGES[stage])
            for view in views:
                view = dataclasses.replace(view.rescaled(*pixels[1]), global_descriptor=features.global_descriptor)
                seen = self._rank(view, top_k, exclude, None, None, expand=False, known_global=ranked["own_global"])
                better = (seen["inliers"] >= conf["synthesis_min_inliers"]) & (seen["inliers"] > ranked["inliers"])
                for row in np.flatnonzero(better):
                    ranked["inliers"][row], ranked["matches"][row] = seen["inliers"][row], seen["matches"][row]
            done["views"] += len(views)
        if done["views"]:
            ranked["order"] = verified_first(ranked["order"], ranked["fused"], ranked["inliers"])
            done["s"] = time.perf_counter() - start
        return done

    def wants_views(self, ranked):
        """(whether view synthesis should run for this ranking, its promise: how strong the
        evidence that the query's match is in the index, for a batch that synthesizes the most
        promising first). Only where nothing verified with `synthesis_min_inliers`; there, on
        evidence (benchmarks/README.md, "View synthesis where it pays"): a partial fit (the
        candidate RANSAC fitted best, under min_inliers) turned by `synthesis_turn` degrees or
        more, as a rolled photo's few matches are, or a strong global neighbour with the local
        scores concentrated on one image: a candidate at least `synthesis_global` similar by
        the global descriptor, and one with a local score of `synthesis_votes`. The promise:
        the turned fit's inliers, if any, plus the best local score: turned fits first."""
        conf = self.conf
        if not (conf["use_verification"] and conf["synthesis_stages"]):
            return False, 0.0
        if ranked["inliers"].max(initial=0) >= conf["synthesis_min_inliers"]:
            return False, 0.0
        count, qxy, dxy = max(ranked["tried"].values(), key=lambda fit: fit[0], default=(0, None, None))
        turned = count if count and abs(verify.fit_shape(qxy, dxy)[1]) >= conf["synthesis_turn"] else 0
        rows = ranked["order"]
        best = ranked["own_global"][rows][np.isfinite(ranked["own_global"][rows])].max(initial=0.0)
        votes = float(ranked["local"][rows].max(initial=0.0))
        near = conf["use_global"] and best >= conf["synthesis_global"] and votes >= conf["synthesis_votes"]
        return bool(turned or near), turned + votes

    def query_pixels(self, query):
        """(the query's pixels as extraction prepares them, its original (width, height))."""
        max_side = self.extractor.conf["max_image_size"]
        try:
            return prepare_for_extraction(query, max_side)
        except (UserError, OSError) as e:
            raise QueryError(f"cannot read the query {str(query)[:200]!r}: {e}") from e

    def _rank(self, features, top_k, exclude, prepared, timings, expand=True, known_global=None):
        """The ranking of one query's features: {"order", "fused", "global", "local", "inliers",
        "matches", "tried", "own_global"} (every stage of `conf`: local scores, global fusion,
        verification, expansion unless not `expand`; "global" after expansion, "own_global"
        the query descriptor's). `known_global`: the own_global of a ranking with the same
        global descriptor (`_global_scores`' `known`)."""
        start = time.perf_counter()
        conf, artifact = self.conf, self.artifact
        n = artifact.num_rows  # int ids; dead rows keep theirs and are never ranked
        local_scores = np.zeros(n, np.float32)
        if (conf["use_local"] or conf["use_verification"]) and len(features):
            if prepared is None:
                prepared = self.prepare(features)
            if conf["use_local"]:
                local_scores = self._local_scores(prepared, n, len(features))
        else:
            prepared = None
        local_part = self._local_weight() * local_scores
        rankable = artifact.live.copy()
        rankable[[artifact.row_of[i] for i in exclude if i in artifact.row_of]] = False
        # enough rows for the results and the shortlist; all of them when every result is asked for
        count = int(rankable.sum()) if top_k is None else max(int(top_k), conf["shortlist"])
        local_done = time.perf_counter()
        expand = expand and (conf["expansion"] or conf["graph_expansion"])
        global_scores = np.zeros(n, np.float32)
        if conf["use_global"]:
            # an expansion re-ranks with new scores: it needs every row's
            partial = top_k is not None and not expand
            fusion = (local_part, rankable, count) if partial else ()
            global_scores = self._global_scores(features.global_descriptor, *fusion, known=known_global)
        fused = global_scores * conf["use_global"] + local_part
        order, own_global = best_rows(fused, rankable, count), global_scores
        searched = time.perf_counter()
        inliers, matches, tried = np.zeros(n, np.int64), {}, {}
        if conf["use_verification"] and prepared is not None:
            self._verify_shortlist(features, prepared, order, inliers, matches, tried)
            if expand:
                global_scores, fused = self._expand(features, global_scores, local_scores, fused, inliers)
                order = best_rows(fused, rankable, count)
                self._verify_shortlist(features, prepared, order, inliers, matches, tried)
            order = verified_first(order, fused, inliers)
        if timings is not None:
            timings.update(
                search_s=searched - start,
                verify_s=time.perf_counter() - searched,
                local_s=local_done - start,  # the parts of search_s
                global_s=searched - local_done,
            )
        return {"order": order, "fused": fused, "global": global_scores, "local": local_scores,
                "inliers": inliers, "matches": matches, "tried": tried, "own_global": own_global}  # fmt: skip

    def _database_globals(self):
        if self.conf["use_dba"]:
            if self.artifact.dba_index is None:
                raise QueryError("use_dba needs an augmented index: run delf-index match --augment on it")
            return self.artifact.dba_index
        return self.artifact.global_index

    def _global_scores(self, descriptor, local=None, rankable=None, count=None, known=None):
        """Cosine similarity of a global descriptor with every indexed image [num_rows].

        Given what it is fused with (the weighted local scores), the rows that may rank and how
        many of the best fused scores are wanted, only the rows that can be among those are
        scored, the others are -inf: the GLOBAL_TOP best by global score, and the rows whose
        local score can lift them, from at most the last of those's global score, to the
        `count`-th best fused score among them. The same scores and ranking as scoring every
        row, whose heap cost 11-23 ms at 100k images (benchmarks/README.md). `known`: this
        descriptor's scores from an earlier call (a synthesized view shares its query's global
        descriptor): only the rows these local scores lift that it left -inf are scored."""
        database, n = self._database_globals(), self.artifact.num_rows
        query = np.asarray(descriptor, np.float32)[None]
        if known is not None and not np.isneginf(known).any():
            return known

        def score_rows(k, params=None):  # into scores; faiss's -1 (a descriptor it could not score) skipped
            sims, rows = database.search(query, k, params=params)
            found = rows[0] >= 0
            scores[rows[0][found]] = sims[0][found]
            return rows[0], found.all()

        if local is not None and n > GLOBAL_TOP and count > 0:
            if known is None:
                scores = np.full(n, -np.inf, np.float32)
                rows, complete = score_rows(GLOBAL_TOP)
                bound = scores[rows[-1]]
            else:  # the GLOBAL_TOP best and the rows an earlier local score lifted (no higher than those)
                scores = known.copy()
                rows = np.flatnonzero(np.isfinite(scores))
                complete = len(rows) >= GLOBAL_TOP
                bound = np.partition(scores[rows], len(rows) - GLOBAL_TOP)[len(rows) - GLOBAL_TOP] if complete else 0
            top = rows[rankable[rows]]
            if complete and len(top) >= count:
                fused = scores[top] + local[top]
                threshold = np.partition(fused, len(fused) - count)[len(fused) - count]
                lifted = rankable & (bound + local >= threshold) & np.isneginf(scores)
                lifted = np.flatnonzero(lifted)
                if len(lifted) <= n // 4:  # else scoring every row costs less
                    if len(lifted):
                        score_rows(len(lifted), faiss.SearchParameters(sel=faiss.IDSelectorBatch(lifted)))
                    return scores
        scores = np.zeros(n, np.float32)
        score_rows(n)
        return scores

    def _verify_shortlist(self, features, prepared, order, inliers, matches, tried):
        """Verify the rows among the first `shortlist` of `order` not `tried` yet; fills
        `inliers` and `matches` (rows under min_inliers keep 0) and `tried` ({row: (inliers,
        query xy, database xy)}, fits under min_inliers too: evidence for view synthesis)."""
        shortlist = list(order[: self.conf["shortlist"]])
        rows = [row for row in shortlist if row not in tried]
        if self.method == "asmk" and rows:
            # neighbours among the whole shortlist (as k-NN voting's are among the whole index),
            # also when an expansion round verifies only its new rows
            prepared = {**prepared, "neighbours": self.shortlist_neighbours(prepared["reduced"], shortlist)}
        for row in rows:
            count, qxy, dxy = self._verify(features, prepared, row)
            tried[row] = (count, qxy, dxy)
            if count >= self.conf["min_inliers"]:
                inliers[row] = count
                matches[row] = (qxy, dxy)

    def _expand(self, features, global_scores, local_scores, fused, inliers):
        """(global scores, fused scores) after expansion with the verified results that have at
        least qe_min_inliers (at most qe_top, most inliers first); unchanged without any."""
        conf = self.conf
        strong = np.nonzero(inliers >= conf["qe_min_inliers"])[0]
        strong = strong[np.argsort(-inliers[strong], kind="stable")][: conf["qe_top"]]
        if not len(strong):
            return global_scores, fused
        if conf["expansion"] and conf["use_global"]:
            database = self._database_globals()
            others = np.stack([database.reconstruct(int(r)) for r in strong])
            query = expansion.alpha_qe(features.global_descriptor, others, conf["qe_alpha"])
            global_scores = self._global_scores(query)
        bonus = np.zeros_like(fused)
        if conf["graph_expansion"]:
            if self.artifact.graph is None:
                raise QueryError("graph_expansion needs an augmented index: run delf-index match --augment on it")
            for row in strong:
                near, _ = expansion.neighbours_of(self.artifact.graph, row, conf["qe_min_inliers"])
                bonus[near] += conf["graph_weight"] / len(strong)
        fused = global_scores * conf["use_global"] + self._local_weight() * local_scores + bonus
        return global_scores, fused

    def _local_weight(self):
        return self.conf["asmk_weight"] if self.method == "asmk" else self.conf["local_weight"]

    def _local_scores(self, prepared, n, count):
        """[n] local scores: k-NN votes, ASMK similarities, or for "both" their mean (ASMK's
        brought to the votes' scale by the ratio of their weights, each tuned against the
        global similarity)."""
        votes = self._votes(prepared["neighbours"], n, count) if self.method != "asmk" else None
        if self.method == "knn":
            return votes
        bits = self.artifact.pca["components"].shape[0]
        similarity = asmk.search(self.artifact.asmk, *prepared["asmk"], self.asmk_conf, bits=bits)
        if self.method == "asmk":
            return similarity
        ratio = self.conf["asmk_weight"] / self.conf["local_weight"]
        return (0.5 * (votes + ratio * similarity)).astype(np.float32)

    def prepare(self, features):
        """What the local stages of this query need, computed once: {"neighbours": ...} for
        k-NN voting, {"asmk": (words, signatures), "reduced": ...} for ASMK, both for "both"."""
        out = {"neighbours": self.neighbours(features)} if self.method != "asmk" else {}
        if self.method != "knn":
            reduced = pca_lib.apply_pca_in_faiss(features.descriptors, self.artifact.pca)
            assignments = asmk.assign(
                self.artifact.asmk_words, reduced, self.asmk_conf["query_assignments"], self.asmk_conf["hnsw_ef"]
            )
            out.update(asmk=asmk.aggregate(reduced, assignments, self.artifact.asmk_centroids), reduced=reduced)
        return out

    def neighbours(self, features):
        """k nearest database descriptors of each query descriptor: (sims, image rows, feature
        indices), each [n, k]; missing neighbours have row -1."""
        if self.artifact.index is None:
            raise QueryError("the index has no k-NN lists (built with --method asmk)")
        reduced = pca_lib.apply_pca_in_faiss(features.descriptors, self.artifact.pca)
        params = faiss.SearchParametersIVF(nprobe=int(self.conf["nprobe"]), sel=self.artifact.selector)
        sims, ids = self.artifact.index.search(reduced, self.conf["knn"], params=params)
        rows, feats = art.split_ids(np.where(ids < 0, 0, ids))
        rows = np.where(ids < 0, -1, rows)
        return sims, rows, feats

    def _votes(self, neighbours, n, count):
        """Per image: sum over query descriptors of their best (sim - floor)+ in that image,
        divided by the number of query descriptors."""
        sims, rows, _ = neighbours
        weight = np.maximum(sims - self.conf["vote_floor"], 0)
        query = np.repeat(np.arange(len(rows)), rows.shape[1])
        keep = (rows.ravel() >= 0) & (weight.ravel() > 0)
        pairs, w = query[keep] * n + rows.ravel()[keep], weight.ravel()[keep]
        # the best weight of each (query descriptor, image) pair: sort by weight, first of each
        order = np.argsort(-w, kind="stable")
        _, first = np.unique(pairs[order], return_index=True)
        chosen = order[first]
        votes = np.bincount(pairs[chosen] % n, weights=w[chosen], minlength=n)
        return (votes / max(count, 1)).astype(np.float32)

    def correspondences(self, features, neighbours, row):
        """One-to-one correspondences with one database image from the k-NN results, greedily
        by similarity: (query indices, query xy, database xy, database scales, similarities)."""
        sims, rows, feats = neighbours
        q, slot = np.nonzero(rows == row)
        s, f = sims[q, slot], feats[q, slot]
        for side in ("query", "database"):  # each query descriptor, then each db feature, once
            order = np.argsort(-s, kind="stable")
            q, f, s = q[order], f[order], s[order]
            _, first = np.unique(q if side == "query" else f, return_index=True)
            q, f, s = q[first], f[first], s[first]
        db_xy, db_scale = self.artifact.geometry_of(row, f)
        return q, features.keypoints[q], db_xy, db_scale, s

    def shortlist_neighbours(self, reduced, rows):
        """k nearest neighbours of each query descriptor (PCA-reduced) among the descriptors of
        database images `rows`, decoded from their compact codes (an index with ASMK): what
        `neighbours` gives k-NN voting, over an exact search of the shortlist only."""
        decoded = self.artifact.reduced_descriptors(rows)
        counts = [len(decoded[row]) for row in rows]
        owners = np.repeat(np.asarray(rows, np.int64), counts)
        feature = np.arange(sum(counts)) - np.repeat(np.cumsum(counts) - counts, counts)
        flat = faiss.IndexFlatIP(reduced.shape[1])
        flat.add(np.concatenate([decoded[row] for row in rows] + [np.zeros((0, reduced.shape[1]), np.float32)]))
        sims, ids = flat.search(np.ascontiguousarray(reduced, np.float32), self.conf["knn"])
        found = ids >= 0  # fewer than k descriptors in the shortlist: -1
        safe = np.where(found, ids, 0)
        if not len(owners):
            return sims, np.full(ids.shape, -1), np.zeros(ids.shape, np.int64)
        return sims, np.where(found, owners[safe], -1), np.where(found, feature[safe], 0)

    def _verify(self, features, prepared, row):
        """(inliers, query xy, database xy) of one database image; the inliers strongest first
        (by descriptor similarity: what a picture of the match draws first)."""
        q, query_xy, db_xy, db_scale, similarity = self.correspondences(features, prepared["neighbours"], row)
        if len(q) < self.ransac_conf["min_inliers"]:
            return 0, None, None
        _, mask = verify.ransac_affine(
            query_xy, db_xy, tuple(self.artifact.sizes[row]), self.ransac_conf, features.scale[q], db_scale
        )
        strongest = np.argsort(-similarity[mask], kind="stable")
        return int(mask.sum()), query_xy[mask][strongest], db_xy[mask][strongest]
