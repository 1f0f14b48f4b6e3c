"""Score a per-pixel run (cgm-pixel) against the foreground mask "pixel > 0.5".

    python benchmarks/segmentation.py runs/cgm-pixel-mnist-seed0 [--threshold 0.5]

Every image of the run's data set is segmented (p(l_p | x) at its chain, argmax label); for
each label the IoU of its pixels with the mask (any channel above the threshold) is printed,
and the best-matching label's IoU is written to RUN_DIR/segmentation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from ppl_cluster.api import Clusterer
from ppl_cluster.data import load_run_dataset, unit
from ppl_cluster.report import read_config as _read_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--threshold", type=float, default=0.5)
    args = p.parse_args(argv)
    cfg = _read_config(args.run_dir)
    clu = Clusterer.load(os.path.join(args.run_dir, "checkpoint.pt"))
    ds = load_run_dataset(cfg)
    labels = clu.segment(ds.x).argmax(1)  # (N, H, W)
    mask = unit(ds.x).numpy().max(1) > args.threshold
    iou = [float((labels == k)[mask].sum() / ((labels == k) | mask).sum())
           for k in range(int(labels.max()) + 1)]
    out = {"run": args.run_dir, "threshold": args.threshold, "iou_per_label": iou,
           "best_label": int(np.argmax(iou)), "iou": max(iou), "n_images": len(ds)}
    with open(os.path.join(args.run_dir, "segmentation.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"{args.run_dir}: IoU per label {', '.join(f'{v:.4f}' for v in iou)}; best {max(iou):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
