"""How much Dice the working size alone costs: a perfect working-size target, resized back.

    python bench/quantization_ceiling.py [--sizes 64x88,96x128,128x176]

For every nerve frame of ``positives-256``, the native 420x580 mask is brought to the working size
the way the preprocess stage does it, either as a 0/1 mask (pixels at least half covered) or as each
pixel's coverage (``train.soft_targets``), then resized back to 420x580 and thresholded at 0.5 as the
inference path does with the network's probabilities. Its Dice against the native mask is the best a
network that learned that target perfectly could score: the ceiling the working grid sets.
Writes ``bench/results/quantization_ceiling.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from real_cv import DATA, NAME, native_dice, native_masks  # noqa: E402

sys.path.insert(0, str(ROOT.parent))
from pipeline.preprocess import resize_mask  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x88,96x128,128x176", help="working sizes HxW, comma-separated")
    parser.add_argument("--out", default=str(ROOT / "results" / "quantization_ceiling.json"))
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"{DATA}: not found; this benchmark needs the real frames", file=sys.stderr)
        return 2
    began = time.perf_counter()
    names = [p.stem for p in sorted((DATA / "positives-256" / "images").glob("*.jpg")) if NAME.match(p.stem)]
    native = native_masks(names)
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        hard, soft = zip(*(resize_mask(mask, h, w) for mask in native))
        # As if a network had output exactly that target: resized back and thresholded like its probabilities.
        rows.append({"working_size": f"{h}x{w}", "frames": len(names),
                     "dice_0_1_mask": round(float(native_dice(np.stack(hard).astype(np.float32), native).mean()), 4),
                     "dice_coverage": round(float(native_dice(np.stack(soft) / np.float32(255), native).mean()), 4)})
    report = {"rows": rows, "seconds": round(time.perf_counter() - began, 1),
              "command": "python " + " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| working size | frames | Dice ceiling, 0/1 target | Dice ceiling, coverage target |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['working_size']} | {r['frames']} | {r['dice_0_1_mask']:.4f} | {r['dice_coverage']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
