"""Drift between data versions: each version's profile, and the comparison with the previous one.

GX Core has no cross-batch expectations, so the project does this check (``drift`` in
:mod:`pipeline.validation.checks`). A profile is a handful of figures (:func:`compute_profile`) kept
as ``<gx_dir>/gx/profiles/<DVC md5>.json``, committed with the data version; the previous version is
found in git's history of the ``.dvc`` file (:func:`previous_data_hash`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_write_text
from pipeline.config import ValidationParams
from pipeline.validation.checks import BY_NAME
from pipeline.validation.report import ExpectationFailure, plain

DRIFT = BY_NAME["drift"]
PROFILE_DIR = "profiles"  # <gx_dir>/gx/profiles/<dvc md5>.json, committed with the data version


def compute_profile(manifest: pd.DataFrame) -> dict:
    """The figures drift is judged on: frame count, mean of frame means and of frame spreads,
    empty-mask share, and the 5th/50th/95th percentiles of the non-empty mask areas."""
    def num(col: str) -> pd.Series:
        if col not in manifest:
            return pd.Series(dtype="float64")
        return pd.to_numeric(manifest[col], errors="coerce").dropna().astype("float64")

    areas = num("mask_area")
    nonempty = areas[areas > 0]
    q = nonempty.quantile([0.05, 0.5, 0.95]).tolist() if len(nonempty) else [0.0, 0.0, 0.0]
    means, stds = num("intensity_mean"), num("intensity_std")
    return {
        "n_frames": int(len(means)),
        "intensity_mean": round(float(means.mean()), 3) if len(means) else 0.0,
        "intensity_std": round(float(stds.mean()), 3) if len(stds) else 0.0,
        "empty_share": round(float((areas == 0).mean()), 4) if len(areas) else 0.0,
        "mask_area_p05": round(q[0], 1),
        "mask_area_p50": round(q[1], 1),
        "mask_area_p95": round(q[2], 1),
    }


def compare_profiles(current: dict, previous: dict, rules: ValidationParams) -> dict:
    """Each figure before and after, and whether it moved more than the rules allow."""
    def fig(name: str, limit: float, relative: bool = False) -> dict:
        before, after = float(previous.get(name, 0.0)), float(current.get(name, 0.0))
        change = (after - before) / before if relative and before else after - before
        return {"previous": before, "current": after, "change": round(change, 4),
                "limit": limit, "drifted": abs(change) > limit}

    figures = {
        "intensity_mean": fig("intensity_mean", rules.drift_intensity_mean),
        "intensity_std": fig("intensity_std", rules.drift_intensity_std),
        "empty_share": fig("empty_share", rules.drift_empty_share),
        "mask_area_p50": fig("mask_area_p50", rules.drift_mask_area, relative=True),
    }
    for name in ("mask_area_p05", "mask_area_p95", "n_frames"):
        figures[name] = {"previous": previous.get(name), "current": current.get(name),
                         "drifted": False}
    return {"figures": figures, "drifted": any(f["drifted"] for f in figures.values())}


def drift_failure(drift: dict, rules: ValidationParams) -> ExpectationFailure | None:
    """The ``drift`` check's failure when a figure moved beyond its limit, else None."""
    if not drift.get("drifted"):
        return None
    moved = [k for k, v in drift["figures"].items() if v.get("drifted")]
    return ExpectationFailure(
        expectation="drift_against_previous_data_version",
        column=", ".join(moved),
        description=f"{DRIFT.describe(rules)} {str(drift.get('previous_hash', ''))[:12]}",
        files=[],
        details=plain(drift),
        check=DRIFT.name,
        severity=rules.severity(DRIFT.name),
    )


def profile_path(gx_dir: Path, dvc_hash: str) -> Path:
    return Path(gx_dir) / "gx" / PROFILE_DIR / f"{dvc_hash.replace('.dir', '')}.json"


def save_profile(gx_dir: Path, dvc_hash: str, profile: dict) -> Path:
    path = profile_path(gx_dir, dvc_hash)
    atomic_write_text(path, json.dumps({"dvc_hash": dvc_hash, **profile}, indent=2, sort_keys=True) + "\n")
    return path


def previous_data_hash(root: Path, dvc_file: Path, current_hash: str) -> str | None:
    """The DVC hash of the newest earlier git revision of ``dvc_file`` with another hash."""
    from pipeline import versioning  # noqa: PLC0415

    root = Path(root)
    rel = Path(dvc_file).resolve().relative_to(root.resolve()).as_posix()
    log_ = versioning.git(root, "log", "--format=%H", "--", rel, check=False)
    for rev in log_.stdout.split():
        shown = versioning.git(root, "show", f"{rev}:{rel}", check=False)
        if shown.returncode != 0:
            continue
        try:
            import yaml  # noqa: PLC0415

            md5 = (yaml.safe_load(shown.stdout) or {}).get("outs", [{}])[0].get("md5")
        except Exception:  # noqa: BLE001 (an odd old revision is skipped)
            continue
        if md5 and md5 != current_hash:
            return md5
    return None


def load_profile(gx_dir: Path, dvc_hash: str | None) -> dict | None:
    if not dvc_hash:
        return None
    path = profile_path(gx_dir, dvc_hash)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None
