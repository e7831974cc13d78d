"""How much Dice the working size alone costs: a perfect working-size target, resized back.

    python bench/quantization_ceiling.py [--sizes 64x88,96x128,128x176]

For every nerve frame of ``positives-256``, the native 420x580 mask is brought to the working size
the way the preprocess stage does it, either as a 0/1 mask (pixels at least half covered) or as each
pixel's coverage (``train.soft_targets``), then resized back to 420x580 and thresholded at 0.5 as the
inference path does with the network's probabilities. Its Dice against the native mask is the best a
network that learned that target perfectly could score: the ceiling the working grid sets.
Also how faithful that native mask is: the masks every real-data benchmark scores against are the
256x256 exports' masks with the letterbox undone (lossy JPEG, rescaled twice); they are compared
with the competition's own run-length masks of the same frames (``train_masks.csv``).
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

from real_cv import DATA, command_line, native_dice, native_masks, real_data_missing  # noqa: E402

sys.path.insert(0, str(ROOT.parent))
from pipeline.layout import FRAME_NAME  # noqa: E402
from pipeline.metrics import dice_per_frame  # noqa: E402
from pipeline.preprocess import resize_mask  # noqa: E402
from pipeline.rle import read_rle_csv, rle_decode  # noqa: E402


def export_fidelity(names: list[str], native: np.ndarray) -> dict:
    """Per-frame Dice of the un-letterboxed export masks against the competition's RLE masks."""
    table = read_rle_csv(DATA / "train_masks.csv").set_index("frame_id")
    exact = np.stack([rle_decode(table.loc[name, "pixels"]) for name in names])
    dice = dice_per_frame(native, exact)
    return {"frames": len(names), "mean_dice": round(float(dice.mean()), 4),
            "p1_dice": round(float(np.percentile(dice, 1)), 4), "min_dice": round(float(dice.min()), 4),
            "worst_frame": names[int(np.argmin(dice))],
            "area_ratio": round(float(native.sum() / exact.sum()), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x88,96x128,128x176", help="working sizes HxW, comma-separated")
    parser.add_argument("--out", default=str(ROOT / "results" / "quantization_ceiling.json"))
    args = parser.parse_args()
    if real_data_missing():
        return 2
    began = time.perf_counter()
    names = [p.stem for p in sorted((DATA / "positives-256" / "images").glob("*.jpg")) if FRAME_NAME.match(p.stem)]
    native = native_masks(names)
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        hard, soft = zip(*(resize_mask(mask, h, w) for mask in native))
        # As if a network had output exactly that target: resized back and thresholded like its probabilities.
        rows.append({"working_size": f"{h}x{w}", "frames": len(names),
                     "dice_0_1_mask": round(float(native_dice(np.stack(hard).astype(np.float32), native).mean()), 4),
                     "dice_coverage": round(float(native_dice(np.stack(soft) / np.float32(255), native).mean()), 4)})
    fidelity = export_fidelity(names, native)
    report = {"rows": rows, "export_vs_rle": fidelity, "seconds": round(time.perf_counter() - began, 1),
              "command": command_line()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| working size | frames | Dice ceiling, 0/1 target | Dice ceiling, coverage target |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['working_size']} | {r['frames']} | {r['dice_0_1_mask']:.4f} | {r['dice_coverage']:.4f} |")
    print(f"\nthe scored masks (exports, letterbox undone) vs train_masks.csv: mean Dice {fidelity['mean_dice']:.4f}, "
          f"1st percentile {fidelity['p1_dice']:.4f}, min {fidelity['min_dice']:.4f} ({fidelity['worst_frame']}); "
          f"area ratio {fidelity['area_ratio']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
