#!/usr/bin/env python
"""Export every network family (at its shipped widths) to ONNX and TorchScript and check each file against
PyTorch, as ``segtrain-export`` does: a markdown table of the largest absolute logit difference (fp32) at
each input size, and the export time.

    python scripts/export_check.py [--sizes 97x131,160x96] [--formats onnx,torchscript] [--only pspnet,...]

Weights are random (BatchNorm statistics too, so that nothing is trivially zero); the check does not depend
on training.  Needs ``pip install -e '.[export]'`` for ONNX.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

NETWORKS = {  # name: model.* keys (the shipped configs/model/*.yaml defaults, pretrained off)
    "unet": {"name": "unet", "base_channels": 16},
    "unet-r18": {"name": "unet", "backbone": "resnet18", "base_channels": 16},
    "fcn8s-r50": {"name": "fcn", "backbone": "resnet50", "variant": "8s"},
    "fcn16s-r50": {"name": "fcn", "backbone": "resnet50", "variant": "16s"},
    "fcn32s-r50": {"name": "fcn", "backbone": "resnet50", "variant": "32s"},
    "deconvnet": {"name": "deconvnet", "base_channels": 16},
    "segnet": {"name": "deconvnet", "base_channels": 16, "variant": "segnet"},
    "pspnet-r50": {"name": "pspnet", "backbone": "resnet50", "output_stride": 8},
    "deeplabv3-r50": {"name": "deeplabv3", "backbone": "resnet50", "output_stride": 16},
    "deeplabv3plus-r50": {"name": "deeplabv3plus", "backbone": "resnet50", "output_stride": 16},
    "deeplabv3plus-mnv3": {"name": "deeplabv3plus", "backbone": "mobilenet_v3_large", "output_stride": 16},
    "segformer-b0": {"name": "segformer", "variant": "b0"},
    "upernet-r50": {"name": "upernet", "backbone": "resnet50", "aux": True, "head_channels": 512},
}


def network(spec: dict, num_classes: int):
    import torch
    from omegaconf import OmegaConf

    from segtrain.config import ModelConfig
    from segtrain.models.build import build_model

    torch.manual_seed(0)
    model = build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), spec), num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="97x131,160x96", help="HxW,... (the second runs with batch 2)")
    ap.add_argument("--formats", default="onnx,torchscript")
    ap.add_argument("--only", default="", help="comma-separated names of NETWORKS")
    ap.add_argument("--classes", type=int, default=21)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from segtrain.export import check_export, export_onnx, export_torchscript, exportable

    sizes = [[int(v) for v in s.split("x")] for s in args.sizes.split(",")]
    formats = args.formats.split(",")
    names = args.only.split(",") if args.only else list(NETWORKS)
    head = "| network | " + " | ".join(f"{f} {'x'.join(map(str, s))}" for f in formats for s in sizes)
    print(head + " | " + " | ".join(f"{f} export s" for f in formats) + " |")
    print("|---" * (1 + len(formats) * (len(sizes) + 1)) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            model = network(NETWORKS[name], args.classes)
            diffs, secs = [], []
            for fmt in formats:
                path = Path(tmp) / f"{name}.{'onnx' if fmt == 'onnx' else 'pt'}"
                t0 = time.perf_counter()
                try:
                    if fmt == "onnx":
                        export_onnx(exportable(model), path, 18, {})
                    else:
                        export_torchscript(exportable(model), path)
                    secs.append(f"{time.perf_counter() - t0:.1f}")
                    check = check_export(path, fmt, model, sizes, 1e-3)
                    diffs += [f"{r['max_abs_diff']:.1e}" for r in check["results"]]
                except Exception as e:  # noqa: BLE001 - reported in the table
                    secs.append("-")
                    diffs += [f"FAILED: {str(e)[:80]}"] + [""] * (len(sizes) - 1)
                path.unlink(missing_ok=True)
            print(f"| {name} | " + " | ".join(diffs) + " | " + " | ".join(secs) + " |", flush=True)
            del model


if __name__ == "__main__":
    main()
