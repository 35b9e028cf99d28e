"""GPU check of attention training (device machine): step throughput, and CPU/CUDA loss curves.

1. Data: landmarks-train (GLDv2 photos of 12 landmarks, ``LANDMARKS_TRAIN``) when the data
   set is there, else scikit-image photos, each a class of two images.
2. Loss curves: the same short run (stage 1, then stage 2 with the matchability term) on the
   CPU with seeds 0 and 1, and on CUDA with seed 0 in fp32 (TF32 off) and with bf16
   autocast. The seed-to-seed difference on the CPU is the noise: CUDA reproduces the CPU
   run when its per-epoch losses differ from the CPU seed-0 run by no more than that (or 2 %).
3. Throughput: optimiser steps per second on CUDA for stage 1 (backbone forward and
   backward) and stage 2 (frozen backbone, head), on uint8 batches already in memory (no
   decoding), bf16 autocast, at several batch sizes; and the short run's samples/s with the
   data loader.

Prints one JSON line per measurement; exits with status 1 when the curves disagree.

    python -m benchmarks.gpu_train                     # on the device machine
    python -m benchmarks.gpu_train --device cpu --epochs 1 --steps 2 --batches 2 --tiny

Figures: benchmarks/README.md, "GPU checks (owed)".
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from delf_index.model import train as T


def skimage_manifest(folder):
    """train.csv of scikit-image photos: each photo and its mirror image form one class."""
    from PIL import Image
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
    lines = ["id,path,landmark_id"]
    for k, name in enumerate(names):
        image = np.ascontiguousarray(getattr(data, name)()[:, :, :3])
        for flip in (0, 1):
            Image.fromarray(np.ascontiguousarray(image[:, ::-1]) if flip else image).save(f"{folder}/{name}{flip}.png")
            lines.append(f"{name}{flip},{name}{flip}.png,{k}")
    path = os.path.join(folder, "train.csv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


LANDMARKS_TRAIN = os.environ.get(
    "LANDMARKS_TRAIN", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "landmarks-train")
)


def manifest(folder, tiny=False):
    """landmarks-train's manifest when the data set is here (and not a dry run), else
    scikit-image's."""
    path = os.path.join(LANDMARKS_TRAIN, "train.csv")
    if os.path.exists(path) and not tiny:
        return path, "landmarks-train"
    return skimage_manifest(folder), "scikit-image photos"


def short_run(manifest_path, folder, conf):
    """Per-epoch training losses of a short run, and its samples/s."""
    history = T.train(manifest_path, folder, conf)
    return [h["loss"] for h in history], [h["steps_per_s"] for h in history]


def step_throughput(trainer, stage, batch, crop, steps, num_classes):
    """Optimiser steps per second on in-memory uint8 batches (warm-up steps excluded)."""
    params = trainer.parameters(stage)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    data = {
        "image": torch.randint(0, 256, (batch, crop, crop, 3), dtype=torch.uint8),
        "mask": torch.ones(batch, crop // 16, crop // 16, dtype=torch.bool),
        "label": torch.randint(0, num_classes, (batch,)),
    }
    if trainer.device.type == "cuda":
        data = {k: v.pin_memory() for k, v in data.items()}
    trainer.set_mode(stage, training=True)

    def step():
        losses, _, _ = trainer.losses(stage, data, training=True)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    for _ in range(3):  # cudnn autotuning, allocator warm-up
        step()
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=3, help="stage 2 epochs of the short run")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per throughput measurement")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="small images and crops (a CPU dry run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}), flush=True)
    if device.type == "cuda":
        # the fp32 comparison must be fp32: no TF32 matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    conf = {
        "inputs": "crops",  # the backbone on crops every step: the path a GPU speeds up
        "stage1_epochs": 1,
        "epochs": args.epochs,
        "matchability_weight": 1.0,
        "num_workers": 4 if device.type == "cuda" else 0,
    }
    if args.tiny:
        conf.update(image_size=256, crop_size=128, crops_per_image=1, val_size=128)

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        path, source = manifest(tmp, args.tiny)
        curves = {}
        for label, extra in [
            ("cpu seed 0", {"device": "cpu", "amp": False, "num_workers": 0}),
            ("cpu seed 1", {"device": "cpu", "amp": False, "num_workers": 0, "seed": 1}),
            (f"{args.device} fp32 seed 0", {"device": args.device, "amp": False}),
            (f"{args.device} bf16 seed 0", {"device": args.device, "amp": True}),
        ]:
            start = time.perf_counter()
            losses, rates = short_run(path, os.path.join(tmp, label.replace(" ", "_")), {**conf, **extra})
            curves[label] = losses
            row = {"run": label, "data": source, "losses": [round(v, 4) for v in losses]}
            row.update(steps_per_s=rates, seconds=round(time.perf_counter() - start, 1))
            print(json.dumps(row), flush=True)
        reference = np.array(curves["cpu seed 0"])
        noise = np.abs(np.array(curves["cpu seed 1"]) - reference)
        tolerance = np.maximum(noise.max(), 0.02 * np.abs(reference))
        for label in (f"{args.device} fp32 seed 0", f"{args.device} bf16 seed 0"):
            diff = np.abs(np.array(curves[label]) - reference)
            ok = bool((diff <= tolerance).all())
            failed |= not ok
            print(
                json.dumps(
                    {
                        "check": f"{label} reproduces cpu seed 0",
                        "max_abs_diff": round(float(diff.max()), 4),
                        "seed_noise": round(float(noise.max()), 4),
                        "ok": ok,
                    }
                ),
                flush=True,
            )

        items = T.read_train_manifest(path)
        num_classes = len({it["landmark_id"] for it in items})
        trainer = T.Trainer({**T.default_conf, "amp": device.type == "cuda"}, num_classes, device)
        crop = 128 if args.tiny else args.crop
        for stage in (1, 2):
            for batch in args.batches:
                rate = step_throughput(trainer, stage, batch, crop, args.steps, num_classes)
                row = {"throughput": f"stage {stage}", "batch": batch, "crop": crop, "amp": trainer.amp}
                row.update({"steps/s": round(rate, 2), "crops/s": round(rate * batch, 1)})
                if device.type == "cuda":
                    row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
