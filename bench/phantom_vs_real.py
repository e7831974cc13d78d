"""How close is the synthetic phantom to real brachial-plexus ultrasound?

Compares phantom frames (the default spec of params.yaml: 12 subjects x 30 frames, seed 2016)
with the real Kaggle frames in ``../shared/datasets/kaggle-uns``:

- grey-level histograms (mean, percentiles, and their distance: earth mover's distance in grey
  levels and histogram intersection);
- speckle in homogeneous regions: patches whose smoothed image is flat; median patch SNR
  (mean/std), patch std, and the width of the local autocorrelation (lag where it falls to 0.5,
  lateral and axial, in px);
- the nerve's conspicuity: mean grey inside the mask over a 15-px ring around it, and the
  inside/outside difference in units of the ring's std;
- near-duplicates: median over frames of the highest correlation with another frame of the same
  subject;
- mask areas (percentiles of non-empty masks) and empty share (overall and per subject range),
  the real figures from all 5,635 RLE masks of ``train_masks.csv``, the phantom's from the default
  spec and from a spec as large as the real set (47 subjects x 120 frames, masks only).

Writes ``docs/phantom_vs_real.png`` (real and phantom frames with mask outlines, histograms, area
distributions, autocorrelations) and the table into ``docs/phantom.md`` between the
``realism`` markers, with the command and the machine. Skips (exit 0) when the real data is absent.

    python bench/phantom_vs_real.py [--shared ../shared] [--no-write]
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import phantom  # noqa: E402
from pipeline.phantom import PhantomSpec, synth_frame  # noqa: E402

PATCH = 24  # px, side of the speckle patches
ACF_PATCH = 32
TOP = 40  # rows above this hold the scanner's banner in real frames; left out of the speckle statistics


def read_gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("L"))


def load_real(shared: Path):
    """Real frames/masks of train/ and the RLE table."""
    train = shared / "datasets" / "kaggle-uns" / "train"
    frames = []
    for path in sorted(train.glob("*.tif")):
        m = re.fullmatch(r"(\d+)_(\d+)\.tif", path.name)
        if m:
            frames.append((f"{m[1]}_{m[2]}", int(m[1]), read_gray(path),
                           read_gray(train / f"{m[1]}_{m[2]}_mask.tif") > 0))
    rle = pd.read_csv(shared / "datasets" / "kaggle-uns" / "train_masks.csv")
    return frames, rle


def rle_areas(rle: pd.DataFrame) -> pd.DataFrame:
    """Mask area per frame from the run lengths (every second number); NaN means empty."""
    def area(pixels) -> int:
        if not isinstance(pixels, str) or not pixels.strip():
            return 0
        return int(np.asarray(pixels.split(), int)[1::2].sum())

    return pd.DataFrame({"subject": rle.subject, "area": rle.pixels.map(area)})


def load_phantom(spec: PhantomSpec):
    return [(f"{s}_{n}", s, img, mask > 0) for s in range(1, spec.subjects + 1)
            for n in range(1, spec.frames_per_subject + 1) for img, mask in [synth_frame(spec, s, n)]]


def phantom_areas(spec: PhantomSpec) -> pd.DataFrame:
    rows = [(s, int(np.count_nonzero(phantom._frame_mask(spec, s, n))))
            for s in range(1, spec.subjects + 1) for n in range(1, spec.frames_per_subject + 1)]
    return pd.DataFrame(rows, columns=["subject", "area"])


# --- statistics -----------------------------------------------------------------------------


def histogram(frames) -> np.ndarray:
    h = sum(np.bincount(img[TOP:].ravel(), minlength=256) for _, _, img, _ in frames).astype(float)
    return h / h.sum()


def homogeneous_patches(img: np.ndarray, size: int, share: float = 0.2):
    """The ``share`` of patches (outside the banner) whose large-scale structure is flattest."""
    smooth = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 6.0)
    grad = cv2.magnitude(cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1))
    cand = []
    for y in range(TOP, img.shape[0] - size, size):
        for x in range(0, img.shape[1] - size, size):
            p = img[y:y + size, x:x + size].astype(np.float32)
            if p.mean() < 20 or p.max() >= 250:  # anechoic or saturated: no speckle to measure
                continue
            cand.append((float(grad[y:y + size, x:x + size].mean() + smooth[y:y + size, x:x + size].std()), p))
    cand.sort(key=lambda t: t[0])
    return [p for _, p in cand[:max(1, int(len(cand) * share))]]


def speckle_stats(frames) -> dict:
    snr, sd = [], []
    acf = np.zeros((2 * ACF_PATCH - 1, 2 * ACF_PATCH - 1))
    count = 0
    for _, _, img, _ in frames:
        for p in homogeneous_patches(img, PATCH):
            snr.append(p.mean() / max(p.std(), 1e-6))
            sd.append(p.std())
        for p in homogeneous_patches(img, ACF_PATCH):
            z = p - p.mean()
            if z.std() < 1e-6:
                continue
            c = cv2.filter2D(np.pad(z, ACF_PATCH - 1), cv2.CV_32F, z, anchor=(0, 0),
                             borderType=cv2.BORDER_CONSTANT)[:2 * ACF_PATCH - 1, :2 * ACF_PATCH - 1]
            acf += c / c[ACF_PATCH - 1, ACF_PATCH - 1]
            count += 1
    acf /= max(count, 1)
    centre = ACF_PATCH - 1

    def half_width(profile: np.ndarray) -> float:
        below = np.nonzero(profile < 0.5)[0]
        if not len(below):
            return float(len(profile))
        i = below[0]
        return float(i - 1 + (profile[i - 1] - 0.5) / (profile[i - 1] - profile[i]))

    return {"snr": float(np.median(snr)), "patch_std": float(np.median(sd)),
            "acf_lateral": half_width(acf[centre, centre:]), "acf_axial": half_width(acf[centre:, centre]),
            "acf": acf}


def conspicuity(frames) -> dict:
    ratio, z = [], []
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (31, 31))
    for _, _, img, mask in frames:
        if not mask.any():
            continue
        m = mask.astype(np.uint8)
        ring = (cv2.dilate(m, kernel) > 0) & ~mask
        inside, outside = img[mask].astype(float), img[ring].astype(float)
        ratio.append(inside.mean() / max(outside.mean(), 1e-6))
        z.append(abs(inside.mean() - outside.mean()) / max(outside.std(), 1e-6))
    return {"inside_over_ring": float(np.median(ratio)), "contrast_z": float(np.median(z))}


def near_duplicates(frames) -> float:
    """Median over frames of the best correlation with another frame of the same subject."""
    best = []
    by_subject: dict[int, list[np.ndarray]] = {}
    for _, s, img, _ in frames:
        small = cv2.resize(img, (145, 105), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
        by_subject.setdefault(s, []).append((small - small.mean()) / (small.std() + 1e-6))
    for vecs in by_subject.values():
        if len(vecs) < 2:
            continue
        v = np.stack(vecs)
        c = v @ v.T / v.shape[1]
        np.fill_diagonal(c, -1)
        best.extend(c.max(1))
    return float(np.median(best))


def area_stats(areas: pd.DataFrame) -> dict:
    pos = areas.area[areas.area > 0]
    per_subject = (areas.area == 0).groupby(areas.subject).mean()
    return {"empty": float((areas.area == 0).mean()), "empty_min": float(per_subject.min()),
            "empty_max": float(per_subject.max()), "p5": float(np.percentile(pos, 5)),
            "median": float(np.median(pos)), "p95": float(np.percentile(pos, 95)),
            "min": float(pos.min()), "max": float(pos.max()), "n": len(areas)}


def grey_stats(hist: np.ndarray) -> dict:
    cdf = np.cumsum(hist)
    levels = np.arange(256)
    mean = float((hist * levels).sum())
    return {"mean": mean, "std": float(np.sqrt((hist * (levels - mean) ** 2).sum())),
            "p5": float(np.searchsorted(cdf, 0.05)), "p50": float(np.searchsorted(cdf, 0.5)),
            "p95": float(np.searchsorted(cdf, 0.95)),
            "sat": float(hist[250:].sum())}


# --- picture ------------------------------------------------------------------------------


def outlined(img: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, colour, 2)
    return rgb


def pick(frames, rng: np.random.Generator, nerve: int, empty: int):
    pos = [f for f in frames if f[3].any()]
    neg = [f for f in frames if not f[3].any()]
    chosen = [pos[i] for i in sorted(rng.choice(len(pos), min(nerve, len(pos)), replace=False))]
    chosen += [neg[i] for i in sorted(rng.choice(len(neg), min(empty, len(neg)), replace=False))]
    return chosen


def draw_picture(path: Path, real, synth, hists, areas, acfs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    rows = [("real", pick(real, rng, 3, 1), (255, 60, 60)), ("phantom", pick(synth, rng, 3, 1), (255, 60, 60))]
    fig = plt.figure(figsize=(16, 11.5), dpi=80)
    grid = fig.add_gridspec(3, 4, height_ratios=[1, 1, 0.9])
    for r, (name, chosen, colour) in enumerate(rows):
        for c, (fid, _, img, mask) in enumerate(chosen):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(outlined(img, mask, colour))
            ax.set_title(f"{name} {fid}" + ("" if mask.any() else " (no nerve)"), fontsize=10)
            ax.axis("off")
    ax = fig.add_subplot(grid[2, 0:2])
    for name, h in hists.items():
        ax.plot(np.arange(256), h, label=name)
    ax.set_xlabel("grey level (rows below the banner)")
    ax.set_ylabel("share of pixels")
    ax.set_title("grey-level histograms")
    ax.legend()
    ax = fig.add_subplot(grid[2, 2])
    bins = np.linspace(0, 18000, 37)
    for name, a in areas.items():
        ax.hist(a.area[a.area > 0], bins=bins, density=True, histtype="step", lw=2, label=name)
    ax.set_xlabel("non-empty mask area (px)")
    ax.set_title("mask areas")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[2, 3])
    lags = np.arange(ACF_PATCH)
    for (name, acf), style in zip(acfs.items(), ("-", "--")):
        ax.plot(lags, acf[ACF_PATCH - 1, ACF_PATCH - 1:], "C0" + style, label=f"{name} lateral")
        ax.plot(lags, acf[ACF_PATCH - 1:, ACF_PATCH - 1], "C1" + style, label=f"{name} axial")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xlim(0, 20)
    ax.set_xlabel("lag (px)")
    ax.set_title("speckle autocorrelation (flat patches)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# --- table --------------------------------------------------------------------------------


def table(rows: list[tuple[str, str, str, str]]) -> str:
    out = ["| figure | real | phantom | real range / target |", "| --- | --- | --- | --- |"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import os

    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, OpenCV {cv2.__version__}"


def replace_section(doc: Path, marker: str, body: str) -> None:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = doc.read_text() if doc.exists() else ""
    if start in text and end in text:
        text = text[:text.index(start)] + f"{start}\n{body}\n{end}" + text[text.index(end) + len(end):]
    else:
        text += f"\n{start}\n{body}\n{end}\n"
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--subjects", type=int, default=12)
    ap.add_argument("--frames-per-subject", type=int, default=30)
    ap.add_argument("--seed", type=int, default=2016)
    ap.add_argument("--hard", action="store_true", help="the harder phantom (PhantomSpec.hard)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    if not (args.shared / "datasets" / "kaggle-uns" / "train_masks.csv").exists():
        print(f"SKIP: no real data under {args.shared}/datasets/kaggle-uns")
        return 0
    t0 = time.perf_counter()
    real, rle = load_real(args.shared)
    spec = PhantomSpec(args.subjects, args.frames_per_subject, args.seed, hard=args.hard)
    synth = load_phantom(spec)
    big = PhantomSpec(47, 120, args.seed)

    hists = {"real": histogram(real), "phantom": histogram(synth)}
    g = {k: grey_stats(h) for k, h in hists.items()}
    cdf_r, cdf_p = np.cumsum(hists["real"]), np.cumsum(hists["phantom"])
    emd = float(np.abs(cdf_r - cdf_p).sum())
    inter = float(np.minimum(hists["real"], hists["phantom"]).sum())
    sp = {"real": speckle_stats(real), "phantom": speckle_stats(synth)}
    cs = {"real": conspicuity(real), "phantom": conspicuity(synth)}
    dup = {"real": near_duplicates([f for f in real if f[1] == 1]), "phantom": near_duplicates(synth)}
    areas = {"real (5,635 RLE masks)": rle_areas(rle), f"phantom {spec.subjects}x{spec.frames_per_subject}":
             phantom_areas(spec), "phantom 47x120": phantom_areas(big)}
    a = {k: area_stats(v) for k, v in areas.items()}
    ar, ap_, ab = a.values()

    def f0(x):
        return f"{x:,.0f}"

    rows = [
        ("frames compared", f"{len(real)} (train/)", (f"{len(synth)} ({spec.subjects}x{spec.frames_per_subject}, "
         f"seed {spec.seed})"), ""),
        ("grey mean / std", f"{g['real']['mean']:.1f} / {g['real']['std']:.1f}",
         f"{g['phantom']['mean']:.1f} / {g['phantom']['std']:.1f}", ""),
        ("grey p5 / p50 / p95", "{p5:.0f} / {p50:.0f} / {p95:.0f}".format(**g["real"]),
         "{p5:.0f} / {p50:.0f} / {p95:.0f}".format(**g["phantom"]), ""),
        ("share of pixels >= 250", f"{g['real']['sat']:.2%}", f"{g['phantom']['sat']:.2%}", ""),
        ("histogram distance: EMD (grey levels) / intersection", "", f"{emd:.1f} / {inter:.2f}",
         "0 / 1 = identical"),
        ("speckle, flat patches: median SNR (mean/std)", f"{sp['real']['snr']:.2f}", f"{sp['phantom']['snr']:.2f}", ""),
        ("speckle, flat patches: median patch std", f"{sp['real']['patch_std']:.1f}",
         f"{sp['phantom']['patch_std']:.1f}", ""),
        ("speckle autocorrelation half-width lateral / axial (px)",
         f"{sp['real']['acf_lateral']:.1f} / {sp['real']['acf_axial']:.1f}",
         f"{sp['phantom']['acf_lateral']:.1f} / {sp['phantom']['acf_axial']:.1f}", ""),
        ("nerve: mean inside / 15-px ring around it", f"{cs['real']['inside_over_ring']:.2f}",
         f"{cs['phantom']['inside_over_ring']:.2f}", ""),
        ("nerve: abs(inside - ring) / ring std", f"{cs['real']['contrast_z']:.2f}", f"{cs['phantom']['contrast_z']:.2f}", ""),
        ("near-duplicates: median best corr. within subject", f"{dup['real']:.2f} (subject 1)", f"{dup['phantom']:.2f}", ""),
        ("empty share", f"{ar['empty']:.1%}", f"{ap_['empty']:.1%} ({ab['empty']:.1%} at 47x120)", "58.8 %"),
        ("empty share per subject, min-max", f"{ar['empty_min']:.0%}-{ar['empty_max']:.0%}",
         f"{ap_['empty_min']:.0%}-{ap_['empty_max']:.0%} ({ab['empty_min']:.0%}-{ab['empty_max']:.0%})", "11 %-98 %"),
        ("mask area p5 / median / p95 (px)", f"{f0(ar['p5'])} / {f0(ar['median'])} / {f0(ar['p95'])}",
         (f"{f0(ap_['p5'])} / {f0(ap_['median'])} / {f0(ap_['p95'])} "
         f"({f0(ab['p5'])} / {f0(ab['median'])} / {f0(ab['p95'])})"), "~4,700 / ~7,000 / ~10,300"),
        ("mask area min / max (px)", f"{f0(ar['min'])} / {f0(ar['max'])}",
         f"{f0(ap_['min'])} / {f0(ap_['max'])} ({f0(ab['min'])} / {f0(ab['max'])})", "2,684 / 17,439"),
    ]
    text = table(rows)
    seconds = time.perf_counter() - t0
    print(text)
    print(f"\n({seconds:.0f} s)")
    if args.no_write:
        return 0
    docs = ROOT / "docs"
    draw_picture(docs / "phantom_vs_real.png", real, synth, hists, areas,
                 {"real": sp["real"]["acf"], "phantom": sp["phantom"]["acf"]})
    body = (f"Produced by `python bench/phantom_vs_real.py` on {time.strftime('%Y-%m-%d', time.gmtime())}, "
            f"{machine()}, in {seconds:.0f} s. Real: `../shared/datasets/kaggle-uns` (frames of `train/`, "
            f"areas and empty shares from all of `train_masks.csv`); phantom: in parentheses, masks of a "
            f"47 x 120 spec, as large as the real set.\n\n{text}\n\n![real and phantom frames](phantom_vs_real.png)")
    replace_section(docs / "phantom.md", "realism", body)
    print(f"wrote {docs / 'phantom_vs_real.png'} and the table in {docs / 'phantom.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
