"""Run the network of an exported model in PyTorch (CUDA, bf16 autocast, channels_last).

The .onnx file stays the source of truth: `TorchEngine.from_onnx(path)` reads its metadata,
rebuilds the same network from the same weight files (their sha256 must match what the
model records) and reports the model's fingerprint, so tables written through either engine
are interchangeable. Use it where onnxruntime's CUDA provider is not installed:

    extractor = Extractor(engine=TorchEngine.from_onnx("model.onnx", device="cuda"))
"""

import os

import numpy as np
import onnx
import torch

from delf_index.errors import UserError
from delf_index.model.export import build_model
from delf_index.model.weights import default_weights_path, sha256_file
from delf_index.runtime.extractor import read_model_bytes, shipped_model_path
from delf_index.schemas import model as model_schema


def _default_attention_path(name):
    path = os.path.join(os.path.dirname(__file__), "default", name)
    return path if os.path.exists(path) else None


class TorchEngine:
    """`net` (a model.delf.DELF) as an extractor engine; `metadata` and `fingerprint` are those
    of the exported model it stands for. Build it with `TorchEngine.from_onnx`."""

    def __init__(self, net, metadata, fingerprint, device=None, bf16=None, channels_last=True):
        self.metadata, self.fingerprint = metadata, fingerprint
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerated = self.device.type != "cpu"
        self.bf16 = self.device.type == "cuda" if bf16 is None else bf16
        self.channels_last = channels_last
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # few distinct level sizes: tune each once
        net = net.to(self.device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net.eval()

    @classmethod
    def from_onnx(cls, model=None, weights=None, attention=None, **options):
        """The network of an exported model, rebuilt from the weight files it was exported from."""
        uri = model or shipped_model_path("float32")  # the torch network is the float32 export's
        proto = onnx.load_from_string(read_model_bytes(uri))
        props = {p.key: p.value for p in proto.metadata_props}
        meta = model_schema.parse_metadata(props, source=uri)
        weights = weights or _find_weights(meta)
        _check_sha(weights, meta["weights"]["sha256"], "backbone weights")
        if meta["attention"]["type"] == "learned":
            attention = attention or _default_attention_path(meta["attention"]["file"])
            if attention is None:
                raise UserError(
                    f"{uri} has a learned attention head: pass attention=PATH ({meta['attention']['file']})"
                )
            _check_sha(attention, meta["attention"]["sha256"], "attention weights")
        else:
            attention = None
        net, _ = build_model(meta["backbone"], weights, attention, meta["feature_layer"])
        return cls(net, meta, model_schema.fingerprint(proto), **options)

    def _forward(self, images):
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        x = self.net.normalise(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.net.forward_normalised(x)

    @torch.inference_mode()
    def __call__(self, images):
        """uint8 [B, H, W, 3] -> (features [B, C, h, w], attention [B, h, w], global [B, G])."""
        return [t.float().cpu().numpy() for t in self._forward(images)]

    @torch.inference_mode()
    def candidates(self, images, valid_sizes, k=None):
        """As OnnxEngine.candidates, with masking, top-k and gathering on the device."""
        feats, scores, glob = self._forward(images)
        batch, channels, gh, gw = feats.shape
        stride, offset = self.metadata["stride"], self.metadata["centre_offset"]
        rows = torch.arange(gh, device=self.device) * stride + offset
        cols = torch.arange(gw, device=self.device) * stride + offset
        h, w = (torch.tensor(v, device=self.device) for v in zip(*valid_sizes))
        valid = (rows[None, :, None] < h[:, None, None]) & (cols[None, None, :] < w[:, None, None])
        flat = torch.where(valid, scores.float(), float("-inf")).flatten(1)
        top, cells = flat.topk(min(k or gh * gw, gh * gw), dim=1)
        # [B, h*w, C] is a view of channels_last maps; gather only the chosen rows
        rows_of = feats.permute(0, 2, 3, 1).reshape(batch, gh * gw, channels)
        desc = torch.gather(rows_of, 1, cells[:, :, None].expand(-1, -1, channels)).float()
        top, cells, desc, glob = (t.cpu().numpy() for t in (top, cells, desc, glob.float()))
        out = []
        for b in range(batch):
            keep = np.isfinite(top[b])
            out.append((top[b][keep], cells[b][keep], desc[b][keep], glob[b]))
        return out


def _find_weights(meta):
    try:
        path = default_weights_path(meta["backbone"])
    except UserError as e:
        raise UserError(f"{e}; the model was exported from {meta['weights'].get('file')}") from None
    return path


def _check_sha(path, expected, what):
    actual = sha256_file(path)
    if actual != expected:
        raise UserError(
            f"{what} {path} (sha256 {actual[:12]}) are not the ones the model was exported from ({expected[:12]})"
        )
