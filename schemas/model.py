"""Metadata carried inside every exported DELF ONNX model (ONNX ``metadata_props``).

A worker needs only the .onnx file: the key ``delf_index`` holds this JSON document, the key
``delf_index_fingerprint`` the model's fingerprint (see `fingerprint`). Version 1 fields:

=====================  =========================================================
format, format_version "delf-index-model", 1
backbone, feature_layer which network and which layer gives the local features
descriptor_dim          channels of the local features
global_dim              dimension of the global descriptor
stride, receptive_field, padding, centre_offset
                        geometry of the local features in input pixels: cell (i, j)
                        is centred at (j * stride + centre_offset, i * stride + centre_offset)
input                   {"layout": "NHWC", "dtype": "uint8", "color": "RGB"}
input_multiple          height and width must be multiples of this (pad with pad_value)
mean, std, pad_value    normalisation applied inside the graph, in uint8 units
attention               {"type": "learned" | "l2norm", ...provenance}
default_score_threshold attention threshold the runtime uses unless told otherwise
global_pooling          {"type": "gem", "p": 3.0[, "layer": "local"]}: GeM of the last
                        layer, or of the local features ("local": the network stops there)
weights                 provenance of the backbone weights (source, file, sha256)
outputs                 names of the three outputs
exported_with           versions of torch and onnx, the opset
precision               optional: {"type": "int8", "calibration": ..., "fp32_fingerprint":
                        ...} for a quantized model; absent means float32
=====================  =========================================================
"""

import hashlib
import json

from delf_index.errors import SchemaError

FORMAT = "delf-index-model"
FORMAT_VERSION = 1
METADATA_KEY = "delf_index"
FINGERPRINT_KEY = "delf_index_fingerprint"
OUTPUTS = ("features", "attention", "global_descriptor")
REQUIRED = (
    "format",
    "format_version",
    "backbone",
    "feature_layer",
    "descriptor_dim",
    "global_dim",
    "stride",
    "receptive_field",
    "padding",
    "centre_offset",
    "input_multiple",
    "mean",
    "std",
    "pad_value",
    "attention",
    "default_score_threshold",
    "weights",
)


def fingerprint(model_proto):
    """sha256 of the model's graph and its delf_index metadata.

    Computed over the serialized model with the fingerprint entry removed, so that it is
    stable under re-saving and changes with any weight, node or metadata value.
    """
    props = [(p.key, p.value) for p in model_proto.metadata_props]
    try:
        del model_proto.metadata_props[:]
        for key, value in sorted(props):
            if key != FINGERPRINT_KEY:
                entry = model_proto.metadata_props.add()
                entry.key, entry.value = key, value
        return hashlib.sha256(model_proto.SerializeToString(deterministic=True)).hexdigest()
    finally:
        del model_proto.metadata_props[:]
        for key, value in props:
            entry = model_proto.metadata_props.add()
            entry.key, entry.value = key, value


def stamp(model_proto, meta):
    """Replace the model's metadata by `meta` (JSON) and its fingerprint; returns the fingerprint."""
    del model_proto.metadata_props[:]
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    value = fingerprint(model_proto)
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = FINGERPRINT_KEY, value
    return value


def parse_metadata(props, source="the model"):
    """Validated metadata dict from ONNX metadata_props (a mapping); clear errors otherwise."""
    if METADATA_KEY not in props:
        raise SchemaError(
            f"{source} is not a delf-index model (no '{METADATA_KEY}' metadata); "
            "export one with `delf-index export-model`"
        )
    meta = json.loads(props[METADATA_KEY])
    if meta.get("format") != FORMAT:
        raise SchemaError(f"{source}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SchemaError(
            f"{source} has model format version {meta.get('format_version')}, this delf-index "
            f"reads version {FORMAT_VERSION}: re-export it with this version's `delf-index export-model`"
        )
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise SchemaError(f"{source}: metadata lacks {missing}")
    return meta
