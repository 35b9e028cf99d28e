"""DELF feature extraction at run time: numpy and onnxruntime, no torch.

The procedure of the official DELF extractor: an image pyramid (7 scales by default), each
level run through the network on its own, every feature-map cell a candidate located at the
centre of its receptive field, candidates above the attention threshold kept, the best
`max_features` by score, optional NMS on receptive-field boxes. Differences from the
official code, on purpose (docs/extraction.md):

- keypoints are in original-image pixels with pixel centres at integer coordinates, mapped
  through the exact per-axis resize factors rather than divided by the nominal scale;
- the official files store (y, x); here `x` is the column and `y` the row, kept separately;
- levels are shrunk with area interpolation (anti-aliased), enlarged bilinearly;
- level inputs are padded bottom/right to a multiple of 32 with the mean colour; cells
  centred in the padding are dropped;
- a GeM global descriptor comes from the same passes (averaged over `global_scales`).

Usage:

    extractor = Extractor()                          # the default model, default conf
    feats = extractor.extract_image("photo.jpg")     # a path, URI, bytes or RGB array, prepared as
                                                     # the extract job prepares every image
    feats = extractor(image)                         # uint8 RGB [H, W, 3] as it is -> Features
    many = extractor.extract_batch(images)           # same-size pyramid levels share a forward pass
"""

import functools
import importlib.resources
import json
import threading
import time

import cv2
import numpy as np
import onnx
import onnxruntime as ort

from delf_index.errors import UserError
from delf_index.runtime import storage
from delf_index.runtime.conf import resolve_conf
from delf_index.runtime.features import Features
from delf_index.runtime.images import check_rgb, prepare_for_extraction, shrink_to
from delf_index.schemas import model as model_schema

default_conf = {
    "scales": (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0),  # image pyramid (official DELF)
    "max_image_size": 1024,  # largest image side before the pyramid; None: no limit (DELF v1)
    "score_threshold": None,  # attention threshold; None: the model's default_score_threshold
    "max_features": 1000,  # keep this many features, best first (in the order of `selection`)
    # the order features are kept in: "score", best attention first over the whole pyramid
    # (official DELF), or "levels", the best of each pyramid level in turn, so that every
    # scale keeps its share (benchmarks/README.md, "Learned keypoint selection")
    "selection": "score",
    "nms_iou": None,  # IoU of receptive-field boxes for NMS; None disables it (official default)
    # levels averaged into the global descriptor (DELG's); coarser levels rank better alone on
    # landmarks-dev, through a few queries only, and the full ranking not at all
    # (benchmarks/README.md, "Global descriptor scales")
    "global_scales": (0.7071, 1.0, 1.4142),
    "min_level_size": 10,  # pyramid levels with a side under this many pixels are skipped
    # most pyramid levels of the same size per forward pass; None: 1 on CPUs, where batching
    # was slower (benchmarks/README.md, "CPU extraction"), 8 on accelerators
    "max_batch": None,
}

SELECTIONS = ("score", "levels")  # the orders `selection` knows
SPEED_ONLY = ("max_batch",)  # knobs that change how fast features come, not which
# the models shipped in the package (model/default/MODEL_CARD.md), by precision
SHIPPED_MODELS = {"float32": "delf-efficientnet_lite0.onnx", "int8": "delf-efficientnet_lite0-int8.onnx"}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def recorded_settings(conf):
    """The extraction settings a table records and compares: those that decide the features,
    as JSON keeps them (lists, not tuples)."""
    return json.loads(json.dumps({k: v for k, v in conf.items() if k not in SPEED_ONLY}))


def shipped_model_path(precision="float32"):
    """A .onnx model shipped with the package (model/default/, see its MODEL_CARD.md): the
    float32 export, or its int8 quantization for CPUs.

    They are package data of delf_index.model, which holds the weights (the design's layout);
    reading them imports no code of that package (its __init__ is empty, no torch)."""
    return str(importlib.resources.files("delf_index.model") / "default" / SHIPPED_MODELS[precision])


def default_model(gpu=None):
    """The shipped model used when none is named: "int8" on CPUs (twice as fast, and the same
    retrieval quality within the seed-to-seed spread: benchmarks/README.md, "CPU extraction"),
    "float32" on GPUs. `gpu` None: whether onnxruntime has a GPU provider here."""
    if gpu is None:
        gpu = any(p in ort.get_available_providers() for p in GPU_PROVIDERS)
    return "float32" if gpu else "int8"


def default_model_path(gpu=None):
    return shipped_model_path(default_model(gpu))


def model_path(name=None):
    """The model file a name stands for: a path or URI as it is, "float32" or "int8" for the
    shipped ones (resolved on each machine: Beam workers get the name), None for the default."""
    name = default_model() if name is None else name
    return shipped_model_path(name) if name in SHIPPED_MODELS else name


@functools.lru_cache(maxsize=1)
def _shipped_fingerprints():
    return {load_model(name)[2]: name for name in SHIPPED_MODELS}


def model_of(fingerprint, name=None, gpu=None):
    """The model that extracts for a table or an index made with model `fingerprint` (None: a
    new one): `name` when given, else the shipped model with that fingerprint (an index built
    with the float32 model keeps querying with it), else the default for `gpu`."""
    if name is not None:
        return name
    return _shipped_fingerprints().get(fingerprint) or default_model(gpu)


class ModelError(UserError):
    """A model file that is not a usable delf-index model; the message says why."""


def read_model_bytes(uri):
    """The bytes of a model file on any fsspec filesystem (gs://, s3://, local)."""
    return storage.read_bytes(uri)


def load_model(uri=None):
    """(model bytes, metadata, fingerprint) of an exported model (a path or URI, "float32",
    "int8", or None: the default); refuses altered or foreign files."""
    uri = model_path(uri)
    data = read_model_bytes(uri)
    try:
        proto = onnx.load_from_string(data)
    except Exception as e:
        raise ModelError(f"{uri} is not an ONNX model ({type(e).__name__}: {e})") from e
    props = {p.key: p.value for p in proto.metadata_props}
    metadata = model_schema.parse_metadata(props, source=uri)
    fingerprint = model_schema.fingerprint(proto)
    if props.get(model_schema.FINGERPRINT_KEY) != fingerprint:
        raise ModelError(
            f"{uri}: the stored fingerprint does not match the model's content; the file "
            "was altered after export. Re-export it with `delf-index export-model`"
        )
    return data, metadata, fingerprint


def available_providers(requested=None):
    """onnxruntime execution providers: the requested ones, else TensorRT/CUDA if present, else CPU."""
    have = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in have]
        if missing:
            raise UserError(f"onnxruntime providers {missing} are not available here (have {have})")
        return list(requested)
    preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    return [p for p in preferred if p in have] + ["CPUExecutionProvider"]


class OnnxEngine:
    """Runs the exported model with onnxruntime. One session, safe to share across threads."""

    def __init__(self, model=None, providers=None, threads=None):
        uri = model_path(model)
        data, self.metadata, self.fingerprint = load_model(uri)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        self.providers = available_providers(providers)
        self.session = ort.InferenceSession(data, options, providers=self.providers)
        self.uri = uri
        self.accelerated = self.session.get_providers()[0] != "CPUExecutionProvider"

    def __call__(self, images):
        """uint8 [B, H, W, 3] -> (features [B, C, h, w], attention [B, h, w], global [B, G])."""
        return self.session.run(list(model_schema.OUTPUTS), {"image": images})

    def candidates(self, images, valid_sizes, k=None):
        """Per image: the k best cells of the unpadded region (see `top_cells`) and the global
        descriptor. Engines on accelerators do this on the device, so that only the
        candidates, not the dense maps, travel to the host."""
        feats, scores, glob = self(images)
        meta = self.metadata
        return [
            (*top_cells(feats[b], scores[b], valid_sizes[b], k, meta["stride"], meta["centre_offset"]), glob[b])
            for b in range(len(images))
        ]


def top_cells(feats, scores, valid_size, k, stride, centre_offset):
    """The k best-scoring cells whose centre lies inside `valid_size` (h, w) of a level.

    feats [C, gh, gw], scores [gh, gw] -> (scores [n], flat cell indices [n], descriptors
    [n, C]), unordered; all valid cells when k is None.
    """
    gh, gw = scores.shape
    h, w = valid_size
    rows = np.arange(gh) * stride + centre_offset < h
    cols = np.arange(gw) * stride + centre_offset < w
    flat = np.where(rows[:, None] & cols[None, :], scores, -np.inf).ravel()
    valid = int(rows.sum()) * int(cols.sum())
    if k is not None and k < valid:
        cells = np.argpartition(-flat, k)[:k]
    else:
        cells = np.nonzero(np.isfinite(flat))[0]
    return flat[cells], cells, feats.reshape(feats.shape[0], -1)[:, cells].T


class Extractor:
    """DELF feature extraction with the official procedure; see the module docstring.

    `engine` runs the network (OnnxEngine by default; delf_index.model.torch_engine.TorchEngine
    runs the same network in PyTorch). Thread-safe: one engine serves all threads.
    """

    def __init__(self, model=None, conf=None, engine=None, providers=None, threads=None):
        self.conf = resolve_conf(conf, default_conf, "extractor")
        if self.conf["selection"] not in SELECTIONS:
            raise UserError(f"selection {self.conf['selection']!r}: use one of {SELECTIONS}")
        self.engine = engine or OnnxEngine(model, providers=providers, threads=threads)
        self.metadata = self.engine.metadata
        self.fingerprint = self.engine.fingerprint
        meta = self.metadata
        self.stride = meta["stride"]
        self.centre_offset = meta["centre_offset"]
        self.receptive_field = meta["receptive_field"]
        self.multiple = meta["input_multiple"]
        self.pad_value = np.array(meta["pad_value"], dtype=np.uint8)
        self.max_batch = self.conf["max_batch"] or (8 if getattr(self.engine, "accelerated", False) else 1)
        threshold = self.conf["score_threshold"]
        self.score_threshold = meta["default_score_threshold"] if threshold is None else float(threshold)
        self._lock = threading.Lock()
        self.stats = {"images": 0, "forward_passes": 0, "levels": 0, "seconds_network": 0.0}

    def __call__(self, image):
        """Features of a uint8 RGB array [H, W, 3], in its pixels."""
        return self.extract_batch([image])[0]

    def extract_image(self, image, max_pixels=None):
        """Features of an image given as a path or URI, encoded bytes or a uint8 RGB array,
        decoded and shrunk exactly as the extract job does with every database image
        (runtime/images.py, `prepare_for_extraction`); keypoints in original pixels."""
        limits = {} if max_pixels is None else {"max_pixels": max_pixels}
        array, size = prepare_for_extraction(image, self.conf["max_image_size"], **limits)
        return self.extract_batch([array], original_sizes=[size])[0]

    # -- pyramid --------------------------------------------------------------------------
    def pyramid(self, image):
        """[(scale, resized image padded to the multiple, (h, w) before padding)] of a uint8
        RGB image: the network's inputs."""
        base = shrink_to(image, self.conf["max_image_size"])
        hb, wb = base.shape[:2]
        levels = []
        for s in self.conf["scales"]:
            h, w = round(hb * s), round(wb * s)
            if min(h, w) < self.conf["min_level_size"]:
                continue
            interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
            resized = base if (h, w) == (hb, wb) else cv2.resize(base, (w, h), interpolation=interp)
            m = self.multiple
            hp, wp = -(-h // m) * m, -(-w // m) * m
            if (hp, wp) != (h, w):  # OpenCV's border fill: a fifth of numpy's fill-then-copy time
                colour = [int(v) for v in self.pad_value]
                resized = cv2.copyMakeBorder(resized, 0, hp - h, 0, wp - w, cv2.BORDER_CONSTANT, value=colour)
            levels.append((s, resized, (h, w)))
        return levels

    def run_network(self, inputs, k):
        """{key: the network's outputs (top-k candidates, global pooling)} of (key, level array,
        valid size) inputs: pyramid levels of one shape run as one batch."""
        by_shape = {}
        for item in inputs:
            by_shape.setdefault(item[1].shape, []).append(item)
        outputs = {}
        passes = 0
        start = time.perf_counter()
        for group in by_shape.values():
            for i in range(0, len(group), self.max_batch):
                chunk = group[i : i + self.max_batch]
                batch = np.stack([a for _, a, _ in chunk]) if len(chunk) > 1 else chunk[0][1][None]
                found = self.engine.candidates(batch, [size for _, _, size in chunk], k)
                passes += 1
                for (key, _, _), candidates in zip(chunk, found):
                    outputs[key] = candidates
        with self._lock:
            self.stats["forward_passes"] += passes
            self.stats["levels"] += len(inputs)
            self.stats["seconds_network"] += time.perf_counter() - start
        return outputs

    # -- extraction -----------------------------------------------------------------------
    def extract_batch(self, images, original_sizes=None):
        """Features of each uint8 RGB image [H, W, 3]; pyramid levels of equal size are batched.
        `original_sizes`: (width, height) per image of the originals that `images` were shrunk
        from; keypoints are then reported in those pixels."""
        pyramids, inputs = [], []
        for n, image in enumerate(images):
            image = np.asarray(image)
            check_rgb(image)
            levels = self.pyramid(image)
            pyramids.append((image.shape[:2], levels))
            inputs += [((n, k), level[1], level[2]) for k, level in enumerate(levels)]
        # the best max_features of each level hold the best of the image; NMS may need more
        nms_on = self.conf["nms_iou"] is not None and self.conf["nms_iou"] < 1.0
        outputs = self.run_network(inputs, None if nms_on else self.conf["max_features"])
        results = [
            self._select(size, levels, [outputs[(n, k)] for k in range(len(levels))])
            for n, (size, levels) in enumerate(pyramids)
        ]
        for n, size in enumerate(original_sizes or []):
            if (results[n].width, results[n].height) != tuple(size):
                results[n] = results[n].rescaled(*size)
        with self._lock:
            self.stats["images"] += len(images)
        return results

    def _select(self, size, levels, candidates):
        """Merge the levels' candidates: threshold, order by score, NMS, keep the best."""
        h0, w0 = size
        parts = {key: [] for key in ("score", "x", "y", "scale", "desc", "level")}
        globals_, all_globals = [], []
        for (s, padded, (h, w)), (scores, cells, descriptors, glob) in zip(levels, candidates):
            all_globals.append(glob)
            if any(abs(s - g) < 1e-3 for g in self.conf["global_scales"]):
                globals_.append(glob)
            keep = scores >= self.score_threshold
            scores, cells, descriptors = scores[keep], cells[keep], descriptors[keep]
            grid_width = padded.shape[1] // self.stride
            rows, cols = np.divmod(cells, grid_width)
            # level pixel -> original pixel, pixel centres at integers on both sides
            parts["x"].append((cols * self.stride + self.centre_offset + 0.5) * (w0 / w) - 0.5)
            parts["y"].append((rows * self.stride + self.centre_offset + 0.5) * (h0 / h) - 0.5)
            parts["scale"].append(np.full(len(scores), np.sqrt((h0 / h) * (w0 / w))))
            parts["score"].append(scores)
            parts["desc"].append(descriptors)
            parts["level"].append(np.full(len(scores), len(parts["level"])))
        dim = self.metadata["descriptor_dim"]
        if not levels:
            parts = {key: [np.zeros((0, dim) if key == "desc" else 0, np.float32)] for key in parts}
        x, y, scale, scores, descriptors, level = (
            np.concatenate(parts[key]) for key in ("x", "y", "scale", "score", "desc", "level")
        )
        # best first; ties broken by position so that the order is reproducible
        order = np.lexsort((x, y, scale, -scores))
        if self.conf["selection"] == "levels":  # the k-th best of every level before any (k+1)-th
            order = order[np.argsort(rank_within(level[order]), kind="stable")]
        x, y, scale, scores = x[order], y[order], scale[order], scores[order]
        limit = self.conf["max_features"]
        if self.conf["nms_iou"] is not None and self.conf["nms_iou"] < 1.0:
            keep = nms(x, y, scale * self.receptive_field, self.conf["nms_iou"], limit)
        else:
            keep = np.arange(min(limit, len(scores)))
        x, y, scale, scores = x[keep], y[keep], scale[keep], scores[keep]
        descriptors = descriptors[order[keep]].astype(np.float32)
        descriptors /= np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
        glob = np.mean(globals_ or all_globals, axis=0) if all_globals else np.zeros(self.metadata["global_dim"])
        glob = glob / max(np.linalg.norm(glob), 1e-12)
        return Features(
            x=x.astype(np.float32),
            y=y.astype(np.float32),
            scale=scale.astype(np.float32),
            attention=scores.astype(np.float32),
            descriptors=descriptors,
            global_descriptor=glob.astype(np.float32),
            width=int(w0),
            height=int(h0),
        )

    def describe(self):
        """One-line summary of the model and settings, for logs."""
        meta = self.metadata
        precision = meta.get("precision", {}).get("type", "float32")
        return (
            f"{meta['backbone']}/{meta['feature_layer']} {precision} ({meta['descriptor_dim']}-d, attention="
            f"{meta['attention']['type']}) fingerprint {self.fingerprint[:12]}, conf {json.dumps(self.conf)}"
        )


def rank_within(groups):
    """The rank of each element within its group, in the given order: [0, 0, 1, 0, 1, 2] for
    groups [a, b, a, c, c, c]."""
    rank = np.zeros(len(groups), np.int64)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        rank[members] = np.arange(len(members))
    return rank


def nms(x, y, box_size, iou, limit):
    """Greedy NMS of square boxes centred at (x, y), in the given (descending score) order.

    Returns the indices kept, at most `limit`.
    """
    half = box_size / 2
    x0, y0, x1, y1 = x - half, y - half, x + half, y + half
    area = box_size**2
    kept = []
    for i in range(len(x)):
        if kept:
            k = np.asarray(kept)
            iw = np.clip(np.minimum(x1[i], x1[k]) - np.maximum(x0[i], x0[k]), 0, None)
            ih = np.clip(np.minimum(y1[i], y1[k]) - np.maximum(y0[i], y0[k]), 0, None)
            inter = iw * ih
            if np.any(inter / (area[i] + area[k] - inter) > iou):
                continue
        kept.append(i)
        if len(kept) == limit:
            break
    return np.asarray(kept, dtype=np.int64)
