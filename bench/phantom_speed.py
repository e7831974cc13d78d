"""Generation speed of the synthetic phantom: frames per second, files written.

Times ``generate_phantom`` at the default spec (12 subjects x 30 frames, as in params.yaml) into a
temporary folder, from cold caches, best of ``--repeats`` runs; as a reference in the same process
it times writing the same frames and masks as TIFF without rendering them (the I/O floor), and
reports the ratio. The target (issue 3) is at least 20 frames/s on the 2-core machine.
Writes the result into ``docs/phantom.md`` between the ``speed`` markers unless ``--no-write``.

    python bench/phantom_speed.py [--subjects 12] [--frames-per-subject 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import phantom  # noqa: E402
from pipeline.phantom import PhantomSpec, generate_phantom  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=12)
    ap.add_argument("--frames-per-subject", type=int, default=30)
    ap.add_argument("--seed", type=int, default=2016)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    spec = PhantomSpec(args.subjects, args.frames_per_subject, args.seed)
    n = spec.subjects * spec.frames_per_subject
    gen = []
    for _ in range(args.repeats):
        phantom._subject_plan.cache_clear()
        phantom._subject_world.cache_clear()
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            generate_phantom(Path(tmp), spec)
            gen.append(time.perf_counter() - t)
    # Reference: the same frames and masks, rendered beforehand, only written.
    frames = [phantom.synth_frame(spec, s, k) for s in range(1, spec.subjects + 1)
              for k in range(1, spec.frames_per_subject + 1)]
    ref = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            t = time.perf_counter()
            for i, (img, mask) in enumerate(frames):
                phantom._write_tiff_atomic(out / f"{i}.tif", img)
                phantom._write_tiff_atomic(out / f"{i}_mask.tif", mask)
            ref.append(time.perf_counter() - t)
    best, best_ref = min(gen), min(ref)
    from phantom_vs_real import machine, replace_section

    text = "\n".join([
        f"| run | seconds (best of {args.repeats}) | frames/s |",
        "| --- | --- | --- |",
        (f"| `generate_phantom` {spec.subjects} x {spec.frames_per_subject}, cold caches, files written "
        f"| {best:.2f} | **{n / best:.1f}** |"),
        f"| reference: writing the same {n} frames + masks only | {best_ref:.2f} | {n / best_ref:.1f} |",
        f"| ratio generate / write-only | {best / best_ref:.1f} x | |",
    ])
    print(text)
    if not args.no_write:
        body = (f"Produced by `python bench/phantom_speed.py` on {time.strftime('%Y-%m-%d', time.gmtime())}, "
                f"{machine()} (other jobs were running on the machine).\n\n{text}")
        replace_section(ROOT / "docs" / "phantom.md", "speed", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
