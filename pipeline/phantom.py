"""Synthetic ultrasound phantom: the embedded default dataset.

Stands in for the 2016 Kaggle brachial-plexus frames, in their layout
(``train/{subject}_{n}.tif`` and ``train/{subject}_{n}_mask.tif``, 420x580 8-bit).

How a frame is made (B-mode in miniature):

1. Each subject gets a *world*: a tissue echogenicity map somewhat wider than the
   frame (skin, fat, muscle layers with fibre texture, fascia lines, curved bright
   arcs, vessels, an optional strong reflector with its shadow, and in some subjects a fainter
   look-alike: a honeycomb-like cluster or a hypoechoic bundle in a bright rim, drawn like the
   nerve but without a mask). The probe sweeps slowly across it, so neighbouring frames are
   near-duplicates shifted by a few pixels. In some subjects a small superficial reflector
   shadows one side of the nerve.
2. In runs of frames the nerve is in the imaging plane: a honeycomb of dark
   fascicles in a brighter irregular rim, blended into the tissue with a per-subject
   contrast, so it is hard to tell from its surroundings (its conspicuity matches the real
   frames'); at run edges and in some other frames it is fainter and blurred (partly
   out of plane). Its size swings slowly along the sweep. Its mask is the smooth blob that
   outlines it. When it is out of plane the frame shows the same tissue without it.
3. Speckle: complex Gaussian scatterers smoothed by an anisotropic point-spread
   function, part fixed to the tissue and part fresh each frame; its intensity is
   lightly smoothed as a scanner's speckle reduction does (real frames show soft,
   laterally smeared grain rather than raw speckle). Envelope x (echogenicity x
   depth attenuation + receiver noise floor) x gain (drifting slowly over the sweep), then
   log compression to 8 bits.

How hard the nerve is to find is set by ``_DEFAULT`` (learnable by the default quickstart
model, but far from trivial: docs/phantom.md) or ``_HARD`` (``PhantomSpec(hard=True)``).

``plant_defects`` damages a written dataset on purpose (unreadable, wrong-size, RGB, 16-bit,
blank or saturated frames, missing/orphan/non-binary/tiny masks, bad names, near-duplicates
with contradicting masks) for the validation tests; the default phantom is clean.

Everything is drawn from ``numpy.random.default_rng`` seeded from
``(seed, subject)`` for the anatomy and ``(seed, subject, frame)`` for the
speckle, so a subject's frames do not depend on how many subjects are generated,
and the same spec gives byte-identical files. They do depend on
``frames_per_subject``, which sets the length of the sweep and where the nerve runs fall.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.atomic import atomic_output, atomic_write_bytes
from pipeline.layout import FRAME_NAME, IMAGE_SUFFIX, MASK_SUFFIX

__all__ = ["DEFECT_KINDS", "PhantomSpec", "generate_phantom", "plant_defects", "synth_frame"]


@dataclass(frozen=True)
class PhantomSpec:
    """Size and seed of a phantom dataset."""

    subjects: int = 12
    frames_per_subject: int = 30
    seed: int = 2016
    height: int = 420
    width: int = 580
    # Harder still (same masks): a fainter nerve, more and stronger look-alikes, more curved
    # bright arcs. Off by default: the default is tuned to be learnable by the quickstart model
    # but not trivial (docs/phantom.md, bench/phantom_learnability.py).
    hard: bool = False


@dataclass(frozen=True)
class _Difficulty:
    """How hard the nerve is to tell from its surroundings."""

    nerve_contrast: tuple[float, float]  # per subject: share of the honeycomb blended over the tissue
    rim: tuple[float, float]  # per subject: brightness of the epineurium rim over the septa
    oblique_share: float  # share of nerve frames (besides run edges) where it is faint and blurred
    oblique_contrast: float  # contrast factor in those frames
    decoys: tuple[int, int]  # look-alikes per subject (numpy integers range: lo inclusive, hi exclusive)
    decoy_contrast: tuple[float, float]
    arcs: tuple[int, int]  # curved bright fragments per subject
    nerve_shadow: float  # share of subjects where a superficial reflector shadows part of the nerve


# Tuned with bench/phantom_learnability.py (docs/phantom.md): a fainter nerve than this
# (contrast 0.65-0.9, rim 1.8-2.5) left the default quickstart model at the all-empty solution
# (early stopping fires before it learns); 1-2 look-alikes of contrast 0.12-0.28 made it take
# one for the nerve in every frame of a holdout subject (holdout Dice 0.58); 0-1 of contrast
# 0.08-0.2 left it at 0.95; this gives 0.85. The nerve's conspicuity (inside vs ring) is close
# to the real one anyway: oblique frames, shadows and the tissue it lies in do that part.
_DEFAULT = _Difficulty(nerve_contrast=(0.85, 1.0), rim=(2.3, 2.8), oblique_share=0.15, oblique_contrast=0.65,
                       decoys=(0, 2), decoy_contrast=(0.1, 0.26), arcs=(6, 14), nerve_shadow=0.3)
_HARD = _Difficulty(nerve_contrast=(0.55, 0.8), rim=(1.4, 2.2), oblique_share=0.25, oblique_contrast=0.6,
                    decoys=(1, 4), decoy_contrast=(0.25, 0.5), arcs=(25, 45), nerve_shadow=0.5)


# --- figures the phantom is calibrated to (real data: datasets/kaggle-uns/README.md)
_AREA_MEDIAN = 6976.0  # px, non-empty mask area median
# Spread of log(area): real masks vary less between subjects (sd 0.13) than within one (0.21),
# as the plexus's section changes along the sweep. Subjects are spread evenly over the
# between-subject distribution (a low-discrepancy sequence), so even 12 subjects hit the real
# percentiles; within a subject the size swings slowly along the sweep.
_AREA_LOG_SD_SUBJECT = 0.13
_AREA_LOG_SWING = 0.27  # amplitude of the slow within-subject swing of log(area)
_AREA_LOG_JITTER = 0.06  # frame-to-frame jitter of log(area)
_SQRT2_FRAC = 0.41421356237309515  # a second irrational step, independent of the golden one
_EMPTY_MIN, _EMPTY_MAX = 0.12, 0.97  # per-subject empty share range (real: 11 %-98 %)
_EMPTY_SHAPE = 0.75  # u**k with u uniform: mean empty share 0.12 + 0.85/(1+k) ~ 0.6

# --- imaging constants
_SWEEP_AMP = (25.0, 45.0)  # px, half-width of the lateral back-and-forth sweep
_SWEEP_SPEED = (1.0, 3.0)  # px/frame, peak lateral speed of the sweep
_MARGIN = 48  # px of world on each side of the frame (> max sweep amplitude)
_SPECKLE_KEEP = 0.6  # correlation of the speckle between frames (tissue-fixed part)
_DYN_RANGE_DB = 46.0  # log-compression dynamic range
_NOISE_FLOOR = 0.05  # amplitude of the receiver noise, relative to unit echo (about -26 dB)
_GOLDEN = 0.6180339887498949
_GAIN_SWING_DB = (0.5, 2.0)  # per subject: slow drift of the operator's gain over the sweep
_GAIN_JITTER_DB = 0.4


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def generate_phantom(out_dir: Path, spec: PhantomSpec, progress: bool = False) -> pd.DataFrame:
    """Write the phantom under ``out_dir/train`` and return its manifest.

    Files: ``{subject}_{n}.tif`` (frame) and ``{subject}_{n}_mask.tif`` (mask, {0, 255}),
    subjects 1..S and frames 1..M, 8-bit single-channel TIFF. Each file is written to a
    temporary name in the same folder and renamed, so a crash never leaves a half-written
    file under a final name.

    Returns one row per frame: ``frame_id`` ("3_7"), ``subject``, ``n``, ``has_nerve``,
    ``mask_area`` (pixels).
    """
    _check_spec(spec)
    train = Path(out_dir) / "train"
    train.mkdir(parents=True, exist_ok=True)
    keys = [(s, n) for s in range(1, spec.subjects + 1) for n in range(1, spec.frames_per_subject + 1)]
    rows = []
    for subject, n in tqdm(keys, desc="phantom", unit="frame", disable=not progress):
        image, mask = synth_frame(spec, subject, n)
        _write_tiff_atomic(train / f"{subject}_{n}.tif", image)
        _write_tiff_atomic(train / f"{subject}_{n}_mask.tif", mask)
        area = int(np.count_nonzero(mask))
        rows.append({"frame_id": f"{subject}_{n}", "subject": subject, "n": n,
                     "has_nerve": area > 0, "mask_area": area})
    return pd.DataFrame(rows, columns=["frame_id", "subject", "n", "has_nerve", "mask_area"])


def synth_frame(spec: PhantomSpec, subject: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Render frame ``n`` (1..frames_per_subject) of ``subject`` (1-based).

    Returns ``(image, mask)``, both ``(height, width)`` uint8; the mask holds {0, 255}.
    The result does not depend on ``spec.subjects``.
    """
    _check_spec(spec)
    if not (1 <= subject and 1 <= n <= spec.frames_per_subject):
        raise ValueError(f"frame {subject}_{n} is outside the spec {spec}")
    plan = _subject_plan(spec.seed, subject, spec.height, spec.width, spec.frames_per_subject)
    world = _subject_world(spec.seed, subject, spec.height, spec.width, spec.frames_per_subject, spec.hard)
    level = _HARD if spec.hard else _DEFAULT
    rng = np.random.default_rng([spec.seed, subject, n])
    x0 = plan.offsets[n - 1]
    echo = world.echo[:, x0:x0 + spec.width].copy()
    poly = _frame_polygon(plan, n)
    # How clearly the nerve shows: a subject-level figure, lower and blurred in some frames
    # (entering/leaving the plane, or the probe tilted off the plexus's axis).
    oblique = plan.edges[n - 1] or rng.random() < level.oblique_share
    contrast = world.nerve_contrast * rng.uniform(0.85, 1.1) * (level.oblique_contrast if oblique else 1.0)
    if poly is not None:
        _paint_nerve(echo, plan.nerve, poly, plan.scales[n - 1], x0, contrast=min(contrast, 1.0),
                     blur=3.5 if oblique else 2.0, rim_gain=world.rim)
    if world.shadow is not None:  # a superficial reflector shadows part of the nerve
        echo *= world.shadow[:, x0:x0 + spec.width]
    envelope = _speckle(world, rng, x0, spec.height, spec.width)
    # The operator's gain drifts slowly over the sweep, and a little from frame to frame.
    gain_db = (world.gain_db + world.gain_swing * math.sin(world.gain_omega * n + world.gain_phase)
               + rng.normal(0.0, _GAIN_JITTER_DB))
    # The receiver's noise floor: anechoic lumen and deep tissue show dim grain, not black.
    image = _log_compress(envelope * (echo * world.attenuation + _NOISE_FLOOR), gain_db)
    return image, _frame_mask(spec, subject, n)


def _frame_mask(spec: PhantomSpec, subject: int, n: int) -> np.ndarray:
    """The mask of frame ``n`` of ``subject`` alone: cheap, no tissue or speckle is made."""
    plan = _subject_plan(spec.seed, subject, spec.height, spec.width, spec.frames_per_subject)
    mask = np.zeros((spec.height, spec.width), np.uint8)
    poly = _frame_polygon(plan, n)
    if poly is not None:
        cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 255, cv2.LINE_8, shift=4)
    return mask


def _frame_polygon(plan: _Plan, n: int) -> np.ndarray | None:
    """Nerve outline in frame ``n``'s coordinates, or None when the nerve is out of plane."""
    if not plan.present[n - 1]:
        return None
    return _nerve_polygon(plan.nerve, plan.scales[n - 1], plan.offsets[n - 1])


# ---------------------------------------------------------------------------
# Subject: anatomy, sweep and nerve plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Nerve:
    """Nerve geometry in world coordinates, at scale 1."""

    cx: float
    cy: float
    a: float  # semi-axis along the nerve's long direction, px
    b: float  # semi-axis across it, px
    angle: float  # radians
    harmonics: tuple[tuple[int, float, float], ...]  # (k, amplitude, phase) of the outline
    fascicles: tuple[tuple[float, float, float, float, float], ...]  # (u, v, radius, tilt, echo)
    rim_phases: tuple[float, float, float]
    base: float  # echogenicity of the septa between fascicles


@dataclass(frozen=True)
class _Plan:
    """A subject's geometry: the nerve, the sweep, and which frames show the nerve."""

    nerve: _Nerve
    offsets: tuple[int, ...]  # per frame: world column of the frame's left edge
    present: tuple[bool, ...]  # per frame: is the nerve in the imaging plane
    scales: tuple[float, ...]  # per frame: linear size factor of the nerve
    edges: tuple[bool, ...]  # per frame: first or last frame of a run (nerve entering/leaving the plane)


@dataclass(frozen=True)
class _World:
    """A subject's rendered tissue and imaging settings (the costly, cached part)."""

    echo: np.ndarray  # (H, W + 2*margin) float32 tissue echogenicity, nerve absent
    speckle: np.ndarray  # (H, W + 2*margin, 2) float32 tissue-fixed complex speckle, unit power
    attenuation: np.ndarray  # (H, 1) float32 depth attenuation
    psf_sigma: tuple[float, float]  # (lateral, axial) px
    gain_db: float
    nerve_contrast: float = 0.7  # share of the nerve's honeycomb blended over the tissue
    rim: float = 2.5  # brightness of the nerve's rim (epineurium) over its septa
    shadow: np.ndarray | None = None  # (H, W + 2*margin) multiplicative shadow over the nerve, or None
    gain_swing: float = 0.0  # dB, amplitude of the slow gain drift over the sweep
    gain_omega: float = 0.0  # rad/frame
    gain_phase: float = 0.0


def _subject_seeds(seed: int, subject: int) -> list[np.random.SeedSequence]:
    """Independent streams for the geometry and the tissue, so masks can be made alone."""
    return np.random.SeedSequence([seed, subject]).spawn(2)


@lru_cache(maxsize=64)
def _subject_plan(seed: int, subject: int, height: int, width: int, frames: int) -> _Plan:
    """Draw one subject's geometry (cheap; cached because every frame needs it)."""
    rng = np.random.default_rng(_subject_seeds(seed, subject)[0])
    offsets = _sweep_offsets(rng, frames)
    nerve = _draw_nerve(rng, height, width, area=_subject_area(seed, subject))
    present, scales, edges = _nerve_plan(rng, _empty_share(seed, subject), frames)
    return _Plan(nerve=nerve, offsets=offsets, present=present, scales=scales, edges=edges)


@lru_cache(maxsize=2)
def _subject_world(seed: int, subject: int, height: int, width: int, frames: int, hard: bool = False) -> _World:
    """Render one subject's tissue (cached: frames are made subject by subject)."""
    nerve = _subject_plan(seed, subject, height, width, frames).nerve
    rng = np.random.default_rng(_subject_seeds(seed, subject)[1])
    level = _HARD if hard else _DEFAULT
    wh, ww = height, width + 2 * _MARGIN
    echo = _tissue(rng, wh, ww, nerve, level)
    psf = (rng.uniform(2.0, 2.8), rng.uniform(1.0, 1.3))  # lateral resolution is the worse one
    speckle = _blurred_noise(rng, wh, ww, psf)
    depth = np.arange(height, dtype=np.float32)[:, None] / height
    # Attenuation in dB grows with depth; the scanner's time-gain compensation only partly
    # undoes it, so deep tissue is darker.
    att_db = rng.uniform(8.0, 16.0) * depth + rng.uniform(0.0, 4.0) * depth**2
    attenuation = (10.0 ** (-att_db / 20.0)).astype(np.float32)
    gain_db = float(rng.normal(0.0, 2.0))
    shadow = _nerve_shadow(rng, wh, ww, nerve) if rng.random() < level.nerve_shadow else None
    return _World(echo=echo, speckle=speckle, attenuation=attenuation, psf_sigma=psf, gain_db=gain_db,
                  nerve_contrast=float(rng.uniform(*level.nerve_contrast)), rim=float(rng.uniform(*level.rim)),
                  shadow=shadow, gain_swing=float(rng.uniform(*_GAIN_SWING_DB)),
                  gain_omega=float(2 * np.pi / rng.uniform(15, 60)), gain_phase=float(rng.uniform(0, 2 * np.pi)))


def _subject_area(seed: int, subject: int) -> float:
    """Median nerve area of a subject: evenly spread quantiles of a log-normal (see _empty_share)."""
    start = np.random.default_rng([seed, 1]).random()
    u = (start + subject * _SQRT2_FRAC) % 1.0
    return _AREA_MEDIAN * math.exp(_AREA_LOG_SD_SUBJECT * NormalDist().inv_cdf(0.02 + 0.96 * u))


def _empty_share(seed: int, subject: int) -> float:
    """Share of a subject's frames without the nerve.

    A golden-ratio sequence over subject numbers (with a seed-dependent start) spreads the
    shares evenly, so any run of subjects 1..S has an overall empty share near the real
    58.8 % while single subjects range from ~12 % to ~97 %.
    """
    start = np.random.default_rng([seed]).random()
    u = (start + subject * _GOLDEN) % 1.0
    return _EMPTY_MIN + (_EMPTY_MAX - _EMPTY_MIN) * u**_EMPTY_SHAPE


def _nerve_plan(rng: np.random.Generator, empty_share: float, frames: int):
    """Which frames show the nerve (1-2 contiguous runs), its size factor in each, and the run edges."""
    n_pos = round((1.0 - empty_share) * frames)
    n_empty = frames - n_pos
    # Sometimes the probe passes the plexus twice: two runs, with at least one empty frame between.
    n_runs = 2 if n_pos >= 6 and n_empty >= 1 and rng.random() < 0.5 else 1
    present = np.zeros(frames, bool)
    edges = np.zeros(frames, bool)
    scales = np.ones(frames)
    if n_pos:
        # Split the positives into runs, and the empties into the n_runs + 1 gaps around them.
        cut = [int(rng.integers(2, n_pos - 1))] if n_runs == 2 else []
        runs = np.diff([0, *cut, n_pos])
        gaps = rng.multinomial(n_empty - (n_runs - 1), np.ones(n_runs + 1) / (n_runs + 1))
        gaps[1:-1] += 1
        start = gaps[0]
        for length, gap in zip(runs, gaps[1:]):
            present[start:start + length] = True
            # Entering or leaving the imaging plane the nerve's section is smaller.
            if length >= 3:
                scales[start] = scales[start + length - 1] = 0.9
                edges[start] = edges[start + length - 1] = True
            start += length + gap
        # Along the sweep the plexus's section grows and shrinks slowly (log-area swing), plus jitter.
        period = rng.uniform(12.0, 30.0)
        swing = _AREA_LOG_SWING * np.sin(2 * np.pi * np.arange(frames) / period + rng.uniform(0, 2 * np.pi))
        scales *= np.exp(0.5 * (swing + rng.normal(0.0, _AREA_LOG_JITTER, frames)))
    return (tuple(bool(p) for p in present), tuple(float(s) for s in scales),
            tuple(bool(e) for e in edges))


def _sweep_offsets(rng: np.random.Generator, frames: int) -> tuple[int, ...]:
    """Lateral probe position per frame: a slow back-and-forth sweep, bounded by the margin."""
    amp = rng.uniform(*_SWEEP_AMP)
    omega = rng.uniform(*_SWEEP_SPEED) / amp
    phase = rng.uniform(0, 2 * np.pi)
    return tuple(round(_MARGIN + amp * math.sin(omega * i + phase)) for i in range(frames))


def _draw_nerve(rng: np.random.Generator, height: int, width: int, area: float | None = None) -> _Nerve:
    """Size, shape, position and inner structure of a nerve (``area`` at scale 1; drawn if None)."""
    if area is None:
        area = _AREA_MEDIAN * math.exp(rng.normal(0.0, 0.2))
    aspect = rng.uniform(1.15, 1.6)
    b = math.sqrt(area / (math.pi * aspect))
    a = aspect * b
    # Mostly lying (wider than tall) as in the real frames, sometimes tilted up to ~40 degrees.
    angle = rng.normal(0.0, 0.35)
    # Room for the largest size swing along the sweep (scale up to ~1.2).
    half_w = 1.2 * (abs(a * math.cos(angle)) + abs(b * math.sin(angle)))
    half_h = 1.2 * (abs(a * math.sin(angle)) + abs(b * math.cos(angle)))
    x_lo, x_hi = _MARGIN + _SWEEP_AMP[1] + half_w + 10, _MARGIN + width - _SWEEP_AMP[1] - half_w - 10
    y_lo = 75 + half_h
    y_hi = max(y_lo, min(0.72 * height, height - half_h - 20))
    harmonics = tuple((k, rng.uniform(0.0, 0.06) / math.sqrt(k - 1), rng.uniform(0, 2 * np.pi))
                      for k in range(2, 6))
    return _Nerve(cx=rng.uniform(x_lo, x_hi), cy=rng.uniform(y_lo, y_hi), a=a, b=b, angle=angle,
                  harmonics=harmonics, fascicles=_draw_fascicles(rng),
                  rim_phases=tuple(rng.uniform(0, 2 * np.pi, 3)),
                  base=rng.uniform(1.3, 1.9))


def _draw_fascicles(rng: np.random.Generator) -> tuple[tuple[float, float, float, float, float], ...]:
    """Non-overlapping round fascicles packed in the unit disc (the nerve's own frame)."""
    wanted = int(rng.integers(5, 10))
    found: list[tuple[float, float, float, float, float]] = []
    for _ in range(400):
        r = rng.uniform(0.16, 0.27)
        rho, phi = (0.8 - r) * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        u, v = rho * math.cos(phi), rho * math.sin(phi)
        if all(math.hypot(u - fu, v - fv) > r + fr + 0.08 for fu, fv, fr, *_ in found):
            found.append((u, v, r, rng.uniform(0, np.pi), rng.uniform(0.2, 0.5)))
            if len(found) == wanted:
                break
    return tuple(found)


# ---------------------------------------------------------------------------
# Tissue
# ---------------------------------------------------------------------------


def _tissue(rng: np.random.Generator, h: int, w: int, nerve: _Nerve, level: _Difficulty) -> np.ndarray:
    """Echogenicity of the subject's tissue (no nerve): layers, fibres, fascia, vessels."""
    x = np.arange(w, dtype=np.float32)
    skin = 4 + rng.uniform(-1, 1) * np.sin(x / 300)
    fat = _curve(rng, x, rng.uniform(35, 65), 6, max_slope=0.015)
    fascia_depths = np.sort(rng.uniform(fat.mean() + 25, 0.92 * h, int(rng.integers(3, 6))))
    fascias = [_curve(rng, x, d, 12) for d in fascia_depths]

    yy = np.arange(h, dtype=np.float32)[:, None]
    layer = sum((yy > c[None, :]).astype(np.int8) for c in [fat, *fascias])
    levels = np.concatenate([[0.4], rng.uniform(0.35, 1.1, len(fascias) + 1)]).astype(np.float32)
    tilted = rng.random(len(levels)) < 0.5
    fine, tilt = _fibre_texture(rng, h, w)
    texture = np.where(tilted[layer], tilt, fine)
    echo = levels[layer] * np.exp(0.75 * texture)
    echo[yy[:, 0] < skin.max() + 1] = 1.0
    echo *= _bright_lines(rng, h, w, skin, fat, fascias, arcs=level.arcs)
    _add_vessels(rng, echo, nerve)
    _add_decoys(rng, echo, nerve, level)
    _add_reflector(rng, echo, nerve)
    return cv2.GaussianBlur(echo.astype(np.float32), (0, 0), 1.0)


def _curve(rng: np.random.Generator, x: np.ndarray, depth: float, wobble: float,
           max_slope: float = 0.06) -> np.ndarray:
    """A gently curved, slightly sloped tissue boundary y(x)."""
    period = rng.uniform(350, 1100)
    slope = rng.uniform(-max_slope, max_slope)
    return (depth + slope * (x - x.mean()) + rng.uniform(0.3, 1.0) * wobble
            * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))).astype(np.float32)


def _fibre_texture(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Muscle texture: noise stretched along the fibres, straight and tilted/wavy versions."""
    def stretched(sx: float, sy: float) -> np.ndarray:
        n = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), sx, sigmaY=sy)
        return n / n.std()

    # Thin fibres, fibre bundles, and large bright/dark patches of muscle.
    fine = 0.7 * stretched(8.0, 1.2) + 0.6 * stretched(18.0, 3.0) + 0.7 * stretched(40.0, 10.0)
    # Tilted, wavy fibres: shear the texture along a slow sine so the fibres bend.
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    slope = float(rng.uniform(0.08, 0.2) * rng.choice([-1, 1]))
    # float32 on purpose: cv2.remap with one float32 and one float64 map never returns.
    map_y = (ys + slope * (xs - w / 2) + 5 * np.sin(xs / rng.uniform(60, 140))).astype(np.float32)
    tilt = cv2.remap(fine, xs, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return fine / fine.std(), tilt / tilt.std()


def _bright_lines(rng: np.random.Generator, h: int, w: int, skin: np.ndarray, fat: np.ndarray,
                  fascias: list[np.ndarray], arcs: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Multiplicative map of specular lines: skin, fat septa, fascia, intramuscular septa."""
    gain = np.zeros((h, w), np.float32)
    x = np.arange(w, dtype=np.float32)

    def draw(pts: np.ndarray, value: float, thick: int) -> None:
        cv2.polylines(gain, [np.round(pts * 16).astype(np.int32)], False, float(value),
                      thick, cv2.LINE_AA, shift=4)

    draw(np.stack([x, skin], 1), 6.0, 4)
    for depth in rng.uniform(skin.max() + 5, max(fat.min() - 4, skin.max() + 6), int(rng.integers(1, 4))):
        draw(np.stack([x, depth + 0.25 * (fat - fat.mean())], 1), rng.uniform(2.0, 5.0), 2)  # fat septa
    draw(np.stack([x, fat + 1], 1), 5.0, 3)
    for f in fascias:  # long fascia lines, sometimes interrupted
        lo, hi = sorted(rng.uniform(0, w, 2)) if rng.random() < 0.4 else (0, w)
        sel = (x < lo) | (x > hi) if hi - lo < 0.5 * w else (x >= 0)
        draw(np.stack([x[sel], f[sel]], 1), rng.uniform(4.0, 7.0), int(rng.integers(3, 6)))
    # Short slightly curved septa: real muscle is full of them.
    top, bottom = float(fat.mean()) + 8, h - 10
    for _ in range(int(rng.integers(50, 90))):
        cx, cy = rng.uniform(0, w), rng.uniform(top, bottom)
        length, tilt, bend = rng.uniform(20, 120), rng.normal(0, 0.12), rng.normal(0, 0.0015)
        t = np.linspace(-length / 2, length / 2, 12)
        pts = np.stack([cx + t * math.cos(tilt), cy + t * math.sin(tilt) + bend * t**2], 1)
        draw(pts.astype(np.float32), rng.uniform(1.0, 5.0), int(rng.integers(2, 6)))
    # Curved bright fragments (vessel walls, fascia folding round muscle bellies, tendons):
    # the real frames are full of arcs, which is much of why the nerve's rim is hard to see.
    for _ in range(int(rng.integers(*arcs))):
        centre = (int(rng.uniform(0, w)), int(rng.uniform(top, bottom)))
        axes = (int(rng.uniform(10, 45)), int(rng.uniform(6, 25)))
        start = float(rng.uniform(0, 360))
        cv2.ellipse(gain, centre, axes, float(rng.uniform(-40, 40)), start, start + rng.uniform(60, 200),
                    float(rng.uniform(1.5, 5.0)), int(rng.integers(2, 5)), cv2.LINE_AA)
    return 1.0 + cv2.GaussianBlur(gain, (0, 0), 2.5, sigmaY=1.2)


def _add_vessels(rng: np.random.Generator, echo: np.ndarray, nerve: _Nerve) -> None:
    """1-2 anechoic vessels, the first beside the nerve, with optional posterior enhancement."""
    h, w = echo.shape
    side = int(rng.choice([-1, 1]))
    vessels = []
    rx, ry = rng.uniform(18, 34), rng.uniform(14, 26)
    half_w = abs(nerve.a * math.cos(nerve.angle)) + abs(nerve.b * math.sin(nerve.angle))
    if rng.random() < 0.8:  # usually right beside the plexus (e.g. the subclavian artery)
        cx = nerve.cx + side * (half_w + rx + rng.uniform(4, 20))
        cy = nerve.cy + rng.uniform(-0.5, 0.5) * nerve.b
    else:
        cx, cy = rng.uniform(rx, w - rx), rng.uniform(0.55 * h, 0.85 * h)
    vessels.append((cx, cy, rx, ry))
    if rng.random() < 0.5:  # a second, smaller vein on the other side of the nerve, deeper
        rx2, ry2 = rng.uniform(10, 22), rng.uniform(8, 16)
        cx2 = nerve.cx - side * (half_w + rx2 + rng.uniform(30, 120))
        vessels.append((cx2, rng.uniform(nerve.cy + 20, 0.9 * h), rx2, ry2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for cx, cy, rx, ry in vessels:
        theta = np.arctan2(yy - cy, xx - cx)
        # Vessels are not perfect ellipses: the neighbours press on them.
        r = np.hypot((xx - cx) / rx, (yy - cy) / ry) / (1.0 + 0.06 * np.cos(2 * theta + rng.uniform(0, 6.3))
                                                       + 0.04 * np.cos(3 * theta + rng.uniform(0, 6.3)))
        lumen = np.clip((1.08 - r) / 0.16, 0.0, 1.0)  # soft edge
        wall = np.exp(-(((r - 1.1) / 0.1) ** 2)) * (1.0 + 0.8 * np.sin(3 * theta))
        # Blood is anechoic: the lumen replaces whatever tissue was drawn there.
        echo[...] = (echo * (1.0 - lumen) + 0.04 * lumen) * (1.0 + 2.5 * np.clip(wall, 0, None))
        if rng.random() < 0.6:  # fluid attenuates less than tissue: brighter band below
            below = np.clip((yy - cy - ry) / 6.0, 0, 1) * np.exp(-np.clip(yy - cy - ry, 0, None) / 90)
            band = np.exp(-(((xx - cx) / (0.8 * rx)) ** 4))
            echo *= 1.0 + 0.45 * below * band


def _add_decoys(rng: np.random.Generator, echo: np.ndarray, nerve: _Nerve, level: _Difficulty) -> None:
    """Look-alikes without a mask: honeycomb-like clusters (other plexus trunks seen obliquely,
    lymph nodes, knotted fascia, muscle with septa) drawn the way the nerve is drawn.

    They stay in the tissue in every frame, so a model must learn more than "a ring with
    dark dots"; one is often near the nerve, as the real plexus sits among similar structures.
    """
    h, w = echo.shape
    frame_w = w - 2 * _MARGIN
    placed = [(nerve.cx, nerve.cy, max(nerve.a, nerve.b))]
    for _ in range(int(rng.integers(*level.decoys))):
        template = _draw_nerve(rng, h, frame_w)
        size = rng.uniform(0.45, 1.1)
        contrast = rng.uniform(*level.decoy_contrast)  # fainter than the nerve: the model can still learn it
        a, b = template.a * size, template.b * size
        for _ in range(40):
            near = rng.random() < 0.4
            cx = nerve.cx + rng.uniform(-160, 160) if near else rng.uniform(a + 5, w - a - 5)
            cy = float(np.clip(nerve.cy + rng.uniform(-90, 90) if near else rng.uniform(60 + b, 0.88 * h - b),
                               60 + b, h - b - 10))
            if all(math.hypot(cx - px, cy - py) > pr + a + 12 for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, a))
        decoy = _Nerve(cx=cx, cy=cy, a=a, b=b, angle=template.angle, harmonics=template.harmonics,
                       fascicles=template.fascicles if rng.random() < 0.4 else (),
                       rim_phases=template.rim_phases, base=template.base)
        _paint_nerve(echo, decoy, _nerve_polygon(decoy, 1.0, 0), 1.0, 0, contrast=contrast,
                     rim_gain=rng.uniform(*level.rim))


def _nerve_shadow(rng: np.random.Generator, h: int, w: int, nerve: _Nerve) -> np.ndarray:
    """A small superficial strong reflector (a calcified fascia knot, a tendon, the clavicle's
    edge) above the nerve whose shadow falls over one side of it: multiplicative map, 1 outside.

    The reflector itself is drawn bright; the shadow darkens what lies below it, the nerve
    included (the caller applies it after painting the nerve).
    """
    half_w = abs(nerve.a * math.cos(nerve.angle)) + abs(nerve.b * math.sin(nerve.angle))
    half_h = abs(nerve.a * math.sin(nerve.angle)) + abs(nerve.b * math.cos(nerve.angle))
    side = rng.choice([-1.0, 1.0])
    # Lateral extent: from beyond one side of the nerve to cover 20-55 % of its width.
    inner = nerve.cx + side * half_w * (1.0 - 2.0 * rng.uniform(0.2, 0.55))
    outer = nerve.cx + side * (half_w + rng.uniform(10, 60))
    lo, hi = sorted((inner, outer))
    top = rng.uniform(max(20.0, nerve.cy - half_h - 90), max(25.0, nerve.cy - half_h - 25))
    xx = np.arange(w, dtype=np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    across = np.clip((xx - lo) / 6.0, 0, 1) * np.clip((hi - xx) / 6.0, 0, 1)
    depth = np.clip((yy - top - 4.0) / 8.0, 0, 1)
    shadow = 1.0 - rng.uniform(0.45, 0.75) * depth * across
    surface = np.exp(-(((yy - top) / 3.0) ** 2)) * across
    return ((1.0 + rng.uniform(6.0, 14.0) * surface) * shadow).astype(np.float32)


def _add_reflector(rng: np.random.Generator, echo: np.ndarray, nerve: _Nerve) -> None:
    """Optional strong reflector (bone/pleura) deep below the nerve, casting a shadow."""
    h, w = echo.shape
    top = nerve.cy + nerve.b + 45
    if rng.random() > 0.5 or top > h - 40:
        return
    cy = rng.uniform(top, h - 30)
    cx, half = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(60, 130)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arc = cy + ((xx - cx) / half) ** 2 * rng.uniform(5, 14)  # convex surface
    across = np.exp(-(((xx - cx) / half) ** 6))
    surface = np.exp(-(((yy - arc) / 5.0) ** 2)) * across
    shadow = np.clip((yy - arc - 3.0) / 12.0, 0, 1) * across
    echo *= (1.0 + 30.0 * surface) * (1.0 - 0.85 * shadow)


# ---------------------------------------------------------------------------
# Nerve
# ---------------------------------------------------------------------------


def _nerve_polygon(nerve: _Nerve, scale: float, x0: int) -> np.ndarray:
    """Outline of the nerve in frame coordinates: a smooth, slightly irregular ellipse."""
    phi = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    r = 1.0 + sum(amp * np.cos(k * phi + ph) for k, amp, ph in nerve.harmonics)
    u, v = scale * nerve.a * r * np.cos(phi), scale * nerve.b * r * np.sin(phi)
    c, s = math.cos(nerve.angle), math.sin(nerve.angle)
    return np.stack([nerve.cx - x0 + c * u - s * v, nerve.cy + s * u + c * v], 1)


def _paint_nerve(echo: np.ndarray, nerve: _Nerve, poly: np.ndarray, scale: float, x0: int,
                 contrast: float = 1.0, blur: float = 2.0, rim_gain: float = 2.5) -> None:
    """Blend the honeycomb inside the outline ``poly`` into the echo map (in place).

    ``contrast`` (0..1) is how much of the honeycomb replaces the tissue; ``blur`` (px) how
    sharp it is (a nerve partly out of the imaging plane is fainter and blurred).

    The work happens in a small patch around the nerve: painting the whole frame would
    cost more than the rest of the frame together.
    """
    h, w = echo.shape
    pad = 6
    x_lo, y_lo = np.maximum(np.floor(poly.min(0)).astype(int) - pad, 0)
    x_hi, y_hi = np.minimum(np.ceil(poly.max(0)).astype(int) + pad, [w, h])
    local = poly - [x_lo, y_lo]
    patch = np.zeros((y_hi - y_lo, x_hi - x_lo), np.uint8)
    cv2.fillPoly(patch, [np.round(local * 16).astype(np.int32)], 255, cv2.LINE_8, shift=4)

    # Honeycomb: septa at `base`, dark fascicles, a brighter irregular rim (epineurium).
    inner = np.full(patch.shape, nerve.base, np.float32)
    c, s = math.cos(nerve.angle), math.sin(nerve.angle)
    cx, cy = nerve.cx - x0 - x_lo, nerve.cy - y_lo
    for u, v, r, tilt, dark in nerve.fascicles:
        pu, pv = scale * nerve.a * u, scale * nerve.b * v
        centre = (cx + c * pu - s * pv, cy + s * pu + c * pv)
        size = (2 * scale * r * nerve.a * 0.9, 2 * scale * r * nerve.b * 1.05)
        cv2.ellipse(inner, (centre, size, math.degrees(tilt)), float(dark), -1, cv2.LINE_AA)
    dist = cv2.distanceTransform(patch, cv2.DIST_L2, 3)
    yy, xx = np.mgrid[0:patch.shape[0], 0:patch.shape[1]].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    p1, p2, p3 = nerve.rim_phases
    # Irregular rim: bright on some sides, nearly absent on others.
    around = 1.0 + 0.7 * np.cos(2 * theta + p1) + 0.4 * np.cos(3 * theta + p2) + 0.3 * np.cos(5 * theta + p3)
    rim = np.exp(-((dist - 5.0) / 4.5) ** 2) * np.clip(around, 0.0, None)
    view = echo[y_lo:y_hi, x_lo:x_hi]
    # Borrow the surrounding tissue's texture so the inside is not a flat cartoon.
    texture = (view / view.mean()) ** 0.7
    honeycomb = inner * (1.0 + rim_gain * rim) * texture
    alpha = contrast * cv2.GaussianBlur(patch.astype(np.float32) / 255.0, (0, 0), 1.5)
    honeycomb = cv2.GaussianBlur(honeycomb, (0, 0), blur)
    view[...] = view * (1.0 - alpha) + honeycomb * alpha


# ---------------------------------------------------------------------------
# Imaging: speckle, compression, output
# ---------------------------------------------------------------------------


def _gaussian_noise_gain(sigma: tuple[float, float]) -> float:
    """Standard deviation of white unit noise after cv2.GaussianBlur with ``sigma`` (x, y)."""
    kx = cv2.getGaussianKernel(_ksize(sigma[0]), sigma[0])
    ky = cv2.getGaussianKernel(_ksize(sigma[1]), sigma[1])
    return float(np.sqrt((kx**2).sum() * (ky**2).sum()))


def _ksize(sigma: float) -> int:
    """Odd Gaussian kernel size covering +-3 sigma (what cv2 would pick is not documented)."""
    return 2 * math.ceil(3 * sigma) + 1


def _blurred_noise(rng: np.random.Generator, h: int, w: int, psf: tuple[float, float]) -> np.ndarray:
    """Complex (2-channel) Gaussian scatterers smoothed by the PSF, unit mean power."""
    z = rng.standard_normal((h, w, 2), dtype=np.float32)
    z = cv2.GaussianBlur(z, (_ksize(psf[0]), _ksize(psf[1])), psf[0], sigmaY=psf[1])
    return z * np.float32(1.0 / (_gaussian_noise_gain(psf) * math.sqrt(2.0)))


def _speckle(world: _World, rng: np.random.Generator, x0: int, h: int, w: int) -> np.ndarray:
    """Speckle envelope (mean ~1): tissue-fixed part moved with the sweep plus a fresh part."""
    fixed = world.speckle[:, x0:x0 + w]
    fresh = _blurred_noise(rng, h, w, world.psf_sigma)
    z = _SPECKLE_KEEP * fixed + math.sqrt(1 - _SPECKLE_KEEP**2) * fresh
    intensity = cv2.magnitude(np.ascontiguousarray(z[..., 0]), np.ascontiguousarray(z[..., 1])) ** 2
    # Speckle reduction: averaging intensity over about one speckle cell halves its contrast
    # and turns the black interference nulls into soft dark grain.
    sx, sy = world.psf_sigma
    intensity = cv2.GaussianBlur(intensity, (_ksize(sx), _ksize(sy)), sx, sigmaY=sy)
    return np.sqrt(intensity)


def _log_compress(intensity: np.ndarray, gain_db: float) -> np.ndarray:
    """Map linear amplitude to 8 bits over a fixed dB window, as a scanner's display does."""
    db = (20.0 / math.log(10.0)) * np.log(np.maximum(intensity, 1e-6)) + gain_db
    # 0 dB (unit echo, no attenuation) lands at grey ~128, so typical muscle after
    # attenuation sits near the real frames' median (~85-100) and fascia saturates.
    grey = (db + 0.5 * _DYN_RANGE_DB) * (255.0 / _DYN_RANGE_DB)
    return np.clip(grey + 0.5, 0, 255).astype(np.uint8)


def _write_tiff_atomic(path: Path, array: np.ndarray) -> None:
    """Write a TIFF (8-bit grayscale, or whatever ``array``'s dtype/shape says) via a
    temporary file in the same folder, then rename."""
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="TIFF")


# ---------------------------------------------------------------------------
# Defects for the validation tests
# ---------------------------------------------------------------------------

DEFECT_KINDS = (
    "unreadable_frame",  # the frame file is not an image (truncated/garbage bytes)
    "wrong_size",  # the frame is 400x560 while its mask is 420x580
    "non_binary_mask",  # a nerve mask with soft edges (values between 0 and 255)
    "missing_mask",  # a frame whose mask file was deleted
    "orphan_mask",  # a mask file without a frame
    "blank_frame",  # a frame of one constant grey
    "saturated_frame",  # a frame almost entirely at 255
    "rgb_frame",  # the frame stored as 3-channel RGB
    "contradicting_duplicate",  # a near-copy of a nerve frame, new id, same subject, empty mask
    "bad_name",  # a frame/mask pair renamed outside the {subject}_{n}.tif pattern
    "tiny_mask",  # a mask replaced by a small disc (~200 px), far below any real nerve
    "frame_16bit",  # the frame stored as 16-bit grayscale
)
_NEEDS_NERVE = {"non_binary_mask", "contradicting_duplicate"}


def plant_defects(data_dir: Path, kinds: Sequence[str], seed: int = 0) -> list[dict]:
    """Damage a phantom (or any dataset in the competition layout) under ``data_dir/train``.

    Each kind in ``kinds`` (see ``DEFECT_KINDS``; a kind may repeat) hits a different frame,
    picked deterministically from ``seed``. Every write is atomic (temporary file, then
    rename). Returns one dict per planted defect: ``kind``, ``frame_id`` (the frame chosen),
    ``files`` (paths relative to ``data_dir`` that were written, renamed or deleted) and
    ``description``.
    """
    unknown = [k for k in kinds if k not in DEFECT_KINDS]
    if unknown:
        raise ValueError(f"unknown defect kind(s) {unknown}; known: {', '.join(DEFECT_KINDS)}")
    data_dir = Path(data_dir)
    train = data_dir / "train"
    pairs = []  # (subject, n) with both files present
    for path in train.glob(f"*{IMAGE_SUFFIX}"):
        m = FRAME_NAME.match(path.stem)
        if m and path.with_name(path.stem + MASK_SUFFIX).exists():
            pairs.append((int(m["subject"]), int(m["n"])))
    pairs.sort()
    rng = np.random.default_rng([seed, 20160])
    order = [pairs[i] for i in rng.permutation(len(pairs))]

    def has_nerve(key) -> bool:
        with Image.open(train / f"{key[0]}_{key[1]}_mask.tif") as im:
            return bool(np.asarray(im).any())

    # Kinds that need a nerve choose first, so they are not starved by the others.
    todo = sorted(range(len(kinds)), key=lambda i: kinds[i] not in _NEEDS_NERVE)
    chosen: dict[int, tuple[int, int]] = {}
    free = list(order)
    for i in todo:
        pick = next((k for k in free if kinds[i] not in _NEEDS_NERVE or has_nerve(k)), None)
        if pick is None:
            raise ValueError(f"{train}: not enough {'nerve ' if kinds[i] in _NEEDS_NERVE else ''}frames "
                             f"to plant {len(kinds)} defects ({kinds[i]!r} found none left)")
        free.remove(pick)
        chosen[i] = pick
    next_n: dict[int, int] = {}
    for s, n in pairs:
        next_n[s] = max(next_n.get(s, 0), n)
    report = []
    for i, kind in enumerate(kinds):
        s, n = chosen[i]
        frame, mask = train / f"{s}_{n}.tif", train / f"{s}_{n}_mask.tif"
        files, text = _plant_one(kind, frame, mask, s, n, next_n, np.random.default_rng([seed, 20161, i]))
        report.append({"kind": kind, "frame_id": f"{s}_{n}",
                       "files": [str(f.relative_to(data_dir)) for f in files], "description": text})
    return report


def _read_array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def _plant_one(kind: str, frame: Path, mask: Path, s: int, n: int, next_n: dict[int, int],
               rng: np.random.Generator) -> tuple[list[Path], str]:
    """Plant one defect of ``kind`` at frame ``s_n``; returns (files touched, description)."""
    train = frame.parent
    if kind == "unreadable_frame":
        data = frame.read_bytes()
        atomic_write_bytes(frame, b"not a TIFF: " + bytes(rng.integers(0, 256, 64, dtype=np.uint8)) + data[:16])
        return [frame], f"{frame.name} overwritten with bytes that are not an image"
    if kind == "wrong_size":
        image = _read_array(frame)
        _write_tiff_atomic(frame, cv2.resize(image, (560, 400), interpolation=cv2.INTER_AREA))
        return [frame], f"{frame.name} resized to 400x560 (its mask stays {image.shape[0]}x{image.shape[1]})"
    if kind == "non_binary_mask":
        soft = cv2.GaussianBlur(_read_array(mask), (0, 0), 4.0)
        _write_tiff_atomic(mask, soft)
        return [mask], f"{mask.name} blurred: {len(np.unique(soft))} grey levels instead of {{0, 255}}"
    if kind == "missing_mask":
        mask.unlink()
        return [mask], f"{mask.name} deleted; {frame.name} has no mask"
    if kind == "orphan_mask":
        next_n[s] += 1
        orphan = train / f"{s}_{next_n[s]}_mask.tif"
        _write_tiff_atomic(orphan, _read_array(mask))
        return [orphan], f"{orphan.name} written (a copy of {mask.name}) with no frame {s}_{next_n[s]}.tif"
    if kind == "blank_frame":
        image = _read_array(frame)
        _write_tiff_atomic(frame, np.full_like(image, int(rng.integers(0, 40))))
        return [frame], f"{frame.name} replaced by one constant grey"
    if kind == "saturated_frame":
        image = _read_array(frame)
        _write_tiff_atomic(frame, np.maximum(image, 255 - rng.integers(0, 3, image.shape, dtype=np.uint8)))
        return [frame], f"{frame.name} driven to saturation (every pixel 253-255)"
    if kind == "rgb_frame":
        image = _read_array(frame)
        _write_tiff_atomic(frame, np.repeat(image[..., None], 3, axis=2))
        return [frame], f"{frame.name} stored as 3-channel RGB"
    if kind == "contradicting_duplicate":
        image = _read_array(frame).astype(np.int16)
        noisy = np.clip(image + rng.integers(-2, 3, image.shape), 0, 255).astype(np.uint8)
        next_n[s] += 1
        twin, twin_mask = train / f"{s}_{next_n[s]}.tif", train / f"{s}_{next_n[s]}_mask.tif"
        _write_tiff_atomic(twin_mask, np.zeros(image.shape, np.uint8))
        _write_tiff_atomic(twin, noisy)
        return [twin, twin_mask], (f"{twin.name}: {frame.name} with +-2 grey levels of noise, "
                                   f"but an empty mask where {mask.name} has the nerve")
    if kind == "bad_name":
        new_frame, new_mask = train / f"subject{s}-frame{n}.tif", train / f"subject{s}-frame{n}_mask.tif"
        os.replace(frame, new_frame)
        os.replace(mask, new_mask)
        return [new_frame, new_mask], f"{frame.name} and its mask renamed to {new_frame.name} / {new_mask.name}"
    if kind == "tiny_mask":
        shape = _read_array(mask).shape
        tiny = np.zeros(shape, np.uint8)
        cv2.circle(tiny, (int(rng.integers(100, shape[1] - 100)), int(rng.integers(100, shape[0] - 100))), 8, 255, -1)
        _write_tiff_atomic(mask, tiny)
        return [mask], f"{mask.name} replaced by a disc of {int((tiny > 0).sum())} px"
    if kind == "frame_16bit":
        image = _read_array(frame)
        _write_tiff_atomic(frame, image.astype(np.uint16) * 257)
        return [frame], f"{frame.name} stored as 16-bit grayscale"
    raise AssertionError(kind)  # DEFECT_KINDS and this function disagree


def _check_spec(spec: PhantomSpec) -> None:
    """Reject specs the generator cannot honour, naming the problem."""
    if spec.subjects < 1 or spec.frames_per_subject < 1:
        raise ValueError(f"a phantom needs at least one subject and one frame, got {spec}")
    # Anatomy is sized in pixels of the real 420x580 frames; much smaller frames cannot hold it.
    if spec.height < 320 or spec.width < 440:
        raise ValueError(f"phantom frames must be at least 320x440 px, got {spec.height}x{spec.width}")
