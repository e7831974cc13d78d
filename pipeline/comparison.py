"""Which holdout subjects may judge which models: each version's recorded split, and the
comparison set of subjects that none of the compared models trained or validated on.

Every run records the split it trained with (``split/split.json`` in the run, ``split.*`` tags on
the run and the version). The promotion gate and ``nerveseg models --compare`` read each version's
record, never today's settings, and score models only on subjects that are in the current holdout
and unseen by every model compared.

Versions registered before splits were recorded are recovered from what their run logged:

1. ``recovered``: the run's ``split.*`` parameters and the subjects of its data version (from the
   ``.dvc`` file's recorded figures at its git revision, or the DVC cache's listing) give the split
   by the earlier rule (:func:`pipeline.split.legacy_groups`); used when it reproduces the holdout
   subjects the run's evaluation logged.
2. ``holdout-only``: otherwise, the logged holdout subjects are taken as the only ones it did not
   see; every other subject counts as seen (it may have trained on any of them).
3. ``unknown``: with no logged holdout either, every subject counts as seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from pipeline import registry

SPLIT_ARTIFACT = "split/split.json"
SOURCES = ("recorded", "recovered", "holdout-only", "unknown")


@dataclass(frozen=True)
class SplitRecord:
    """The subjects a model trained on, validated on and was scored on."""

    train: list[int]
    validation: list[int]
    holdout: list[int]
    source: str = "recorded"        # one of SOURCES
    digest: str = ""                # of the recorded assignment (data/split.yaml) it came from
    revision: int = 0
    fold: int = 0
    note: str = ""

    @property
    def seen(self) -> set[int]:
        return set(self.train) | set(self.validation)

    def why_seen(self, subject: int) -> str | None:
        """Why this model may not be scored on ``subject``, to follow its name ("champion v3 trained on
        it"); None when it never saw the subject."""
        subject = int(subject)
        if self.source in ("recorded", "recovered"):
            if subject in self.train:
                return "trained on it"
            if subject in self.validation:
                return "validated on it"
            return None
        if self.source == "holdout-only":
            return None if subject in self.holdout else "had it outside its logged holdout (its split was not recorded)"
        return "has an unknown split (not recorded, and its run logged no holdout)"

    def seen_digest(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self.seen)).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SplitRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def tags(self) -> dict[str, str]:
        return {registry.TAG_SPLIT_DIGEST: self.digest, "split.revision": str(self.revision), "split.fold": str(self.fold),
                "split.source": self.source, "split.seen_digest": self.seen_digest(),
                "split.n_train": str(len(self.train)), "split.n_validation": str(len(self.validation)),
                "split.n_holdout": str(len(self.holdout))}


def record_of_prepared(prepared_dir: Path) -> SplitRecord:
    """The split a training on ``data/prepared`` used (its frame table and summary)."""
    from pipeline.preprocess import FRAMES, SUMMARY
    from pipeline.split import subjects_by_part

    frames = pd.read_csv(Path(prepared_dir) / FRAMES)
    summary = json.loads((Path(prepared_dir) / SUMMARY).read_text())
    parts = subjects_by_part(frames)
    return SplitRecord(parts["train"], parts["validation"], parts["holdout"], "recorded",
                       summary.get("split_digest", ""), int(summary.get("split_revision", 0)),
                       int(summary.get("split_fold", 0)))


# --------------------------------------------------------------------------------------------
# A registered version's split
# --------------------------------------------------------------------------------------------
def version_split(name: str, version: str, root: Path | None = None) -> SplitRecord:
    """The split of a registered version: its recorded artifact, else recovered (module docstring).
    ``root``: the project, whose git history and DVC cache hold earlier data versions' subjects."""
    mv = registry.client().get_model_version(name, version)
    recorded = _load_artifact(mv.run_id, SPLIT_ARTIFACT)
    if recorded is not None:
        return SplitRecord.from_dict(json.loads(recorded))
    return recover_split(mv, root)


def _load_artifact(run_id: str | None, artifact: str) -> str | None:
    """A run's text artifact, or None when the run or the artifact does not exist."""
    if not run_id:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}")
    except MlflowException:
        return None


def logged_holdout(run_id: str | None) -> list[int] | None:
    """The holdout subjects a run's evaluation logged (``evaluation/holdout_frames.csv``)."""
    import io

    text = _load_artifact(run_id, "evaluation/holdout_frames.csv")
    if text is None:
        return None
    frames = pd.read_csv(io.StringIO(text))
    return sorted(int(s) for s in frames["subject"].unique()) if "subject" in frames else None


def recover_split(mv, root: Path | None) -> SplitRecord:
    """A pre-recording version's split from its run's parameters, data version and logged holdout."""
    from pipeline.config import SplitParams
    from pipeline.split import SplitError, legacy_groups, part_of

    tags = dict(mv.tags or {})
    holdout = logged_holdout(mv.run_id)
    subjects = data_version_subjects(root, tags) if root is not None else None
    params = None
    if mv.run_id:
        logged = registry.client().get_run(mv.run_id).data.params
        try:
            params = SplitParams(**{k: logged[f"split.{k}"] for k in ("seed", "validation_fraction",
                                                                      "holdout_fraction", "folds", "fold")
                                    if f"split.{k}" in logged})
        except ValueError:
            params = None
    if subjects and params is not None:
        try:
            groups = legacy_groups(subjects, params)
        except SplitError:
            groups = None
        if groups is not None:
            parts = {s: part_of(g, params.fold) for s, g in groups.items()}
            recovered = {p: sorted(s for s, q in parts.items() if q == p) for p in ("train", "validation", "holdout")}
            if holdout is None or recovered["holdout"] == holdout:
                return SplitRecord(recovered["train"], recovered["validation"], recovered["holdout"], "recovered",
                                   fold=params.fold, note="recovered from the run's split.* parameters and the "
                                   "subjects of its data version by the earlier rule")
    if holdout is not None:
        return SplitRecord([], [], holdout, "holdout-only",
                           note="split not recorded: only its logged holdout subjects count as unseen")
    return SplitRecord([], [], [], "unknown", note="split not recorded and no holdout logged: every subject "
                                                   "counts as seen")


def data_version_subjects(root: Path, tags: dict) -> list[int] | None:
    """The subjects of a version's data: the ``.dvc`` file's recorded figures at its git revision,
    else the DVC cache's listing of its hash."""
    import yaml

    from pipeline import versioning
    from pipeline.data_versions import META_KEY, _stats_from_cache

    revision, dvc_file = tags.get(registry.TAG_DATA_REV), tags.get(registry.TAG_DATA_FILE)
    if revision and dvc_file and revision != "uncommitted":
        shown = versioning.git(root, "show", f"{revision}:{dvc_file}", check=False)
        if shown.returncode == 0:
            content = yaml.safe_load(shown.stdout) or {}
            ids = ((content.get("meta") or {}).get(META_KEY) or {}).get("subject_ids")
            if ids:
                return sorted(int(s) for s in ids)
    stats = _stats_from_cache(root, tags.get(registry.TAG_DATA_HASH, "")) if tags.get(registry.TAG_DATA_HASH) else None
    return (stats or {}).get("subject_ids") or None


# --------------------------------------------------------------------------------------------
# The comparison set
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """The current holdout subjects that none of the compared models saw, and why the others are out."""

    subjects: list[int]                              # the comparison set
    holdout_subjects: list[int]                      # the current holdout
    excluded: dict[int, str] = field(default_factory=dict)  # holdout subject -> why it is left out
    n_frames: int = 0

    def digest(self, frames: pd.DataFrame | None = None) -> str:
        """Names the set (and, given its frame table, the exact frames and their content)."""
        key = {"subjects": self.subjects}
        if frames is not None:
            cols = [c for c in ("frame_id", "content_sha1", "mask_sha1") if c in frames]
            key["frames"] = frames[cols].astype(str).values.tolist()
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def excluded_text(self) -> str:
        return "; ".join(f"{s}: {why}" for s, why in sorted(self.excluded.items())) or "none"

    def to_dict(self) -> dict:
        return {"subjects": self.subjects, "holdout_subjects": self.holdout_subjects, "n_frames": self.n_frames,
                "excluded": {str(s): why for s, why in sorted(self.excluded.items())}}


def comparison_set(holdout: pd.DataFrame, models: dict[str, SplitRecord]) -> tuple[Comparison, pd.DataFrame]:
    """The rows of the current holdout frame table (``subject`` column) whose subject none of
    ``models`` ({"champion v3": record, ...}) trained or validated on, and the :class:`Comparison`."""
    holdout_subjects = sorted(int(s) for s in holdout["subject"].unique())
    excluded: dict[int, str] = {}
    for subject in holdout_subjects:
        reasons = [f"{label} {why}" for label, record in models.items() if (why := record.why_seen(subject))]
        if reasons:
            excluded[subject] = "; ".join(reasons)
    kept = [s for s in holdout_subjects if s not in excluded]
    frames = holdout[holdout["subject"].astype(int).isin(kept)].reset_index(drop=True)
    return Comparison(kept, holdout_subjects, excluded, len(frames)), frames


# --------------------------------------------------------------------------------------------
# Every version on one comparison set (`nerveseg models --compare`)
# --------------------------------------------------------------------------------------------
CACHE_DIR = "comparison_cache"  # under the project's mlflow/ folder: one JSON per comparison set


@dataclass(frozen=True)
class VersionScore:
    version: str
    run_id: str | None
    dice: float
    dice_low: float             # 95 % bootstrap interval over the comparison subjects
    dice_high: float
    nerve_dice: float | None
    presence_accuracy: float
    n_frames: int
    split_source: str


def compare_versions(paths, params, versions: list[str] | None = None, progress: bool = True) -> dict:
    """Score every registered version (or ``versions``) on the same frames: the current holdout's
    subjects that none of them trained or validated on. Scores are cached per version (its run) and
    comparison set in ``mlflow/comparison_cache/``, so a second call loads no model."""
    from tqdm import tqdm

    from pipeline import versioning
    from pipeline.evaluate import load_native
    from pipeline.atomic import atomic_write_text
    from pipeline.promotion import paired_bootstrap
    from pipeline.release import holdout_table, score_version

    name = params.registry.model_name
    if not versioning.stage_is_current(paths.root, "preprocess"):
        raise ValueError(f"{paths.rel(paths.prepared_dir)} is not prepared from the current data and split; run "
                         "`nerveseg stage preprocess` (or `nerveseg run`) first")
    listed = {v.version: v for v in registry.list_versions(name)}
    chosen = [str(v) for v in versions] if versions else sorted(listed, key=int)
    unknown = [v for v in chosen if v not in listed]
    if unknown:
        raise ValueError(f"{name} has no version(s) {unknown}; `nerveseg models` lists them")
    records = {v: version_split(name, v, paths.root) for v in chosen}
    holdout = holdout_table(paths)
    comparison, frames = comparison_set(holdout, {f"v{v}": r for v, r in records.items()})
    data_hash = versioning.read_dvc_file(paths.raw_dvc_file)["md5"]
    digest = hashlib.sha256(f"{data_hash}:{comparison.digest(frames)}".encode()).hexdigest()[:16]
    out = {"model": name, "comparison": {**comparison.to_dict(), "digest": digest, "data_hash": data_hash},
           "versions": []}
    if frames.empty:
        return out
    cache_file = paths.mlflow_dir / CACHE_DIR / f"{digest}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    images = masks = None
    for v in tqdm(chosen, desc="score versions", disable=not progress):
        key = f"{v}:{listed[v].run_id}"
        if key not in cache:
            if images is None:
                images, masks = load_native(paths.raw_dir, frames)
            scores = score_version(registry.load_model(f"models:/{name}/{v}"), images, masks,
                                   frames["frame_id"].tolist(), frames["subject"].astype(str).tolist())
            _, low, high = paired_bootstrap(scores.dice, 1000, 0.95, 0, scores.subjects)
            cache[key] = asdict(VersionScore(v, listed[v].run_id, scores.mean_dice, low, high, scores.nerve_dice,
                                             scores.presence_accuracy, len(frames), records[v].source))
            atomic_write_text(cache_file, json.dumps(cache, indent=2))
        out["versions"].append({**cache[key], "aliases": listed[v].aliases,
                                "own_holdout_dice": listed[v].metrics.get("dice")})
    return out
