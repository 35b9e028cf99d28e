"""int8 models for CPU workers: static quantization with onnxruntime's tools.

    delf-index export-model --precision int8 --output model-int8.onnx
    delf-index export-model --precision int8 --calibration 'gs://bucket/photos/*.jpg' --output model-int8.onnx

The float32 export is quantized in QDQ form, weights per output channel (int8), activations
per tensor (uint8) with ranges calibrated on the pyramid levels of a seeded sample of photos
(scikit-image's photographs, unless --calibration names others: any input extract takes),
prepared exactly as extraction prepares them. The model's metadata records the precision,
the calibration and the float32 model's fingerprint; the int8 model has a fingerprint of its
own, so tables and indexes never mix the two. Speed and quality against float32: benchmarks/README.md, "CPU extraction".
"""

import os
import posixpath
import tempfile

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from delf_index.runtime import inputs, storage
from delf_index.runtime.extractor import Extractor
from delf_index.runtime.images import decode_for_extraction
from delf_index.schemas import model as model_schema

default_conf = {
    # photos (at most) whose pyramid levels calibrate the activation ranges; the default set,
    # scikit-image's photographs, has 8
    "calibration_images": 16,
    "seed": 0,  # which photos, when more are given
    "per_channel": True,  # one weight scale per output channel
}


# scikit-image's images that calibrate the shipped int8 model. The choice matters: with
# "motorcycle_right" and "clock" instead of the slide and the text page, landmarks-dev fell
# from 0.948 to 0.937 (seed 0; float32 0.951; benchmarks/README.md, "CPU extraction")
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle_left", "camera",
                  "page")  # fmt: skip


def calibration_photos(spec=None, count=16, seed=0):
    """Decoded photos (RGB, largest side 1024) for calibration, and their names: a seeded
    sample of the images of `spec` (any input extract takes: a glob, a folder, tar shards or a
    manifest, on any store), else scikit-image's photographs."""
    if spec:
        items, _ = inputs.list_input(spec)
        rng = np.random.default_rng(seed)
        if inputs.input_kind(spec) == "tar":
            members = [(f"{uri}#{name}", data) for uri, *_ in items for name, data in inputs.iter_tar(uri)]
        else:
            members = [(uri, None) for _, uri, *_ in items]
        chosen = [members[i] for i in sorted(rng.choice(len(members), min(count, len(members)), replace=False))]
        photos = [decode_for_extraction(data or storage.read_bytes(uri), 1024)[0] for uri, data in chosen]
        return photos, [posixpath.basename(uri) for uri, _ in chosen]
    # scikit-image ships real photos (the [demo] and [dev] extras); calibration needs some
    from skimage import data

    photos = []
    for name in SKIMAGE_PHOTOS[:count]:
        if name.startswith("motorcycle_"):
            image = data.stereo_motorcycle()[0 if name.endswith("left") else 1]
        else:
            image = np.asarray(getattr(data, name)())
        image = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]
        photos.append(np.ascontiguousarray(image, np.uint8))
    return photos, [f"scikit-image {n}" for n in SKIMAGE_PHOTOS[:count]]


class PyramidLevels(CalibrationDataReader):
    """The padded pyramid levels of the photos, one at a time, as the extractor feeds them."""

    def __init__(self, model_path, photos):
        extractor = Extractor(model_path)
        self.levels = [level[1][None] for photo in photos for level in extractor.pyramid(photo)]
        self.position = 0

    def get_next(self):
        if self.position == len(self.levels):
            return None
        self.position += 1
        return {"image": self.levels[self.position - 1]}


def feed_raw_pixels(proto):
    """When the float model converts uint8 pixels to float and the quantizer turns them back
    into uint8 (a folded stem: raw pixels in, model/delf.py), let the stem read the uint8
    pixels with scale 1 and zero point 0: exact, and no pass over the input in float.
    Returns whether it applied."""
    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for q in graph.node:
        cast = producers.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if cast is None or cast.op_type != "Cast" or onnx.helper.get_attribute_value(cast.attribute[0]) != 1:
            continue
        source = cast.input[0]
        if producers.get(source) is None and source not in [i.name for i in graph.input]:
            continue
        scale, zero = initializers[q.input[1]], initializers[q.input[2]]
        if zero.data_type != onnx.TensorProto.UINT8:
            continue
        scale.CopyFrom(onnx.numpy_helper.from_array(np.array(1.0, np.float32), scale.name))
        zero.CopyFrom(onnx.numpy_helper.from_array(np.array(0, np.uint8), zero.name))
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == q.output[0]:
                    node.input[i] = source
        graph.node.remove(q)
        if not any(cast.output[0] in n.input for n in graph.node):
            graph.node.remove(cast)
        return True
    return False


def quantize_int8(fp32_path, output, calibration=None, conf=None):
    """Write the int8 version of the float32 model at `fp32_path` to `output`; returns its
    fingerprint."""
    conf = {**default_conf, **(conf or {})}
    photos, names = calibration_photos(calibration, conf["calibration_images"], conf["seed"])
    source = onnx.load(fp32_path)
    props = {p.key: p.value for p in source.metadata_props}
    meta = model_schema.parse_metadata(props, source=fp32_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        quantized = os.path.join(tmp, "int8.onnx")
        quantize_static(
            prepared,
            quantized,
            PyramidLevels(fp32_path, photos),
            quant_format=QuantFormat.QDQ,
            per_channel=conf["per_channel"],
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )
        proto = onnx.load(quantized)
    raw = feed_raw_pixels(proto)
    meta["precision"] = {
        "type": "int8",
        "method": "onnxruntime static quantization, QDQ, int8 weights per channel, uint8 activations",
        "calibration": names,
        "fp32_fingerprint": props[model_schema.FINGERPRINT_KEY],
        "raw_pixel_input": raw,
    }
    fingerprint = model_schema.stamp(proto, meta)
    onnx.save(proto, output)
    return fingerprint
