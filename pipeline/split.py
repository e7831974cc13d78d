"""The subject split: which part (train, validation, holdout) each subject is in, assigned once.

Frames of one subject are strongly correlated (a slow sweep), so a frame-level split would leak;
every subject lands in exactly one part. And the part of a subject must not change when data
grows: a subject that moved from the holdout into training would make every later comparison on
"unseen subjects" false. So the assignment is data, not a computation:

- It is kept in ``data/split.yaml`` beside ``data/raw.dvc`` and committed with it by
  ``nerveseg data add``; the preprocess stage reads it and never recomputes it.
- A subject's place is ``u = sha256("{seed}:{subject}")`` mapped to [0, 1). A subject that
  arrives after the first assignment goes to the holdout when ``u < holdout_fraction``, to
  validation when ``u`` lies within the next ``validation_fraction`` (or, with ``folds = k > 1``, to
  the fold group ``floor(k·v)`` of the rest), otherwise to train. That depends on nothing but the
  subject's own id and the recorded rule, so the order and size of later batches change nothing,
  and the holdout grows with the data at its share.
- The first assignment deals its subjects by quota in the order of ``u``: each part gets its
  share (at least one subject). A threshold alone would give a small first batch a holdout far
  from its share (the 12-subject phantom: 1 holdout subject instead of 3).
- Removing a subject moves no other; the assignment keeps it, so it gets its old part back if it
  returns.
- Settings (``split.*``) that no longer match the recorded rule are an error; changing the split
  is an explicit, recorded operation (:func:`resplit`, ``nerveseg data resplit --reason``).

With ``folds = k > 1`` non-holdout subjects are recorded as fold groups ``fold0 .. fold{k-1}``;
``split.fold`` picks the group that validates (:func:`part_of`), so moving between folds needs no
resplit, and the holdout is the same for every fold.

:func:`assert_no_subject_leak` checks a split frame table before anything is prepared from it.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.config import SplitParams
from pipeline.identity import OS_USER, Identity

PARTS = ("train", "validation", "holdout")
SPLIT_FILE = "split.yaml"
FORMAT = 1
HEADER = ("# The subject split of the data: which part each subject is in. Written by `nerveseg data add`\n"
          "# and the flow (new subjects only) and `nerveseg data resplit` (docs/data.md); do not edit by hand.\n")


class SplitError(ValueError):
    """The split cannot be made or used as it stands; the message says what to do."""


def split_file(raw_dir: Path) -> Path:
    """Where the assignment of ``raw_dir`` lives: beside its ``.dvc`` file (``data/split.yaml``)."""
    return Path(raw_dir).parent / SPLIT_FILE


def fold_groups(subjects: list[int], folds: int) -> list[list[int]]:
    """Deal subjects (already in order) into ``folds`` groups of near-equal size."""
    return [list(map(int, group)) for group in np.array_split(np.asarray(subjects), folds)]


def group_names(folds: int) -> tuple[str, ...]:
    """The groups of a split with ``folds`` folds: the parts, or the holdout and the fold groups."""
    if folds > 1:
        return ("holdout", *(f"fold{i}" for i in range(folds)))
    return ("holdout", "validation", "train")


def part_of(group: str, fold: int = 0) -> str:
    """The part of a subject in ``group`` when the flow trains fold ``fold``."""
    if group.startswith("fold"):
        return "validation" if int(group[4:]) == fold else "train"
    return group


@dataclass(frozen=True)
class SplitRule:
    """The settings an assignment was made with (``split.*`` but ``fold``)."""

    seed: int
    holdout_fraction: float
    validation_fraction: float
    folds: int

    @classmethod
    def of(cls, params: SplitParams) -> SplitRule:
        return cls(params.seed, params.holdout_fraction, params.validation_fraction, params.folds)

    def to_dict(self) -> dict:
        return {"kind": "hash", "seed": self.seed, "holdout_fraction": self.holdout_fraction,
                "validation_fraction": self.validation_fraction, "folds": self.folds}

    def differences(self, params: SplitParams) -> list[str]:
        """``split.KEY: recorded R, settings S`` for each setting that no longer matches."""
        wanted = SplitRule.of(params)
        return [f"split.{key}: recorded {getattr(self, key)!r}, settings {getattr(wanted, key)!r}"
                for key in ("seed", "holdout_fraction", "validation_fraction", "folds")
                if getattr(self, key) != getattr(wanted, key)]

    def place(self, subject: int) -> float:
        """The subject's fixed place in [0, 1): a salted hash of its id, nothing else."""
        digest = hashlib.sha256(f"{self.seed}:{int(subject)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def by_threshold(self, subject: int) -> str:
        u = self.place(subject)
        if u < self.holdout_fraction:
            return "holdout"
        rest = (u - self.holdout_fraction) / (1 - self.holdout_fraction)  # uniform on [0, 1) again
        if self.folds > 1:
            return f"fold{min(self.folds - 1, int(rest * self.folds))}"
        return "validation" if rest < self.validation_fraction / (1 - self.holdout_fraction) else "train"

    def by_quota(self, subjects: list[int]) -> dict[int, str]:
        """Deal ``subjects`` in the order of their places: each part its share, at least one."""
        return deal(sorted(subjects, key=self.place), self.holdout_fraction, self.validation_fraction, self.folds)



@dataclass(frozen=True)
class SubjectAssignment:
    """Every subject ever assigned, with its group (a part, or a fold group), and how it came to be."""

    rule: SplitRule
    groups: dict[int, str]
    revision: int = 1            # grows with each resplit
    method: str = "quota"        # how the last (re)split dealt its first subjects: quota or adopted
    resplits: tuple[dict, ...] = field(default_factory=tuple)

    def digest(self) -> str:
        """A hash of the rule, the revision and every subject's group (what decides each part)."""
        canonical = json.dumps({"rule": self.rule.to_dict(), "revision": self.revision,
                                "groups": {str(s): g for s, g in sorted(self.groups.items())}},
                               sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def parts(self, fold: int = 0, subjects: list[int] | None = None) -> dict[int, str]:
        """Subject -> part (train, validation, holdout) for fold ``fold``; only ``subjects`` if given."""
        chosen = self.groups if subjects is None else {int(s): self.groups[int(s)] for s in subjects}
        return {s: part_of(g, fold) for s, g in chosen.items()}

    def missing(self, subjects: list[int]) -> list[int]:
        return sorted(set(int(s) for s in subjects) - set(self.groups))

    def extended(self, subjects: list[int]) -> tuple[SubjectAssignment, list[int]]:
        """This assignment with each new subject placed by the rule's threshold; nobody else moves."""
        new = self.missing(subjects)
        if not new:
            return self, []
        groups = dict(self.groups)
        groups.update({s: self.rule.by_threshold(s) for s in new})
        return replace(self, groups=groups), new

    def to_dict(self) -> dict:
        return {"format": FORMAT, "rule": self.rule.to_dict(), "revision": self.revision, "method": self.method,
                "digest": self.digest(), "resplits": [dict(r) for r in self.resplits],
                "subjects": {int(s): g for s, g in sorted(self.groups.items())}}

    @classmethod
    def from_dict(cls, data: dict, where: str = "the split") -> SubjectAssignment:
        try:
            rule = data["rule"]
            groups = {int(s): str(g) for s, g in (data.get("subjects") or {}).items()}
            made = cls(SplitRule(int(rule["seed"]), float(rule["holdout_fraction"]),
                                 float(rule["validation_fraction"]), int(rule["folds"])),
                       groups, int(data.get("revision", 1)), str(data.get("method", "quota")),
                       tuple(data.get("resplits") or ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise SplitError(f"{where}: not a subject split ({type(exc).__name__}: {exc}); restore it from git "
                             f"(`git checkout -- {where}`)") from exc
        unknown = sorted({g for g in groups.values()} - set(group_names(made.rule.folds)))
        if unknown:
            raise SplitError(f"{where}: unknown group(s) {unknown} for a rule with {made.rule.folds} fold(s); "
                             f"restore it from git (`git checkout -- {where}`)")
        return made


def create_assignment(subjects: list[int], params: SplitParams) -> SubjectAssignment:
    """A first assignment: the subjects dealt by quota in the order of their places."""
    subjects = sorted(set(int(s) for s in subjects))
    if len(subjects) < 3:
        raise SplitError(f"a subject split needs at least 3 subjects, found {len(subjects)}: "
                         "add frames of more subjects")
    rule = SplitRule.of(params)
    return SubjectAssignment(rule, rule.by_quota(subjects))


def load_assignment(path: Path) -> SubjectAssignment | None:
    """The recorded assignment, or None when there is none yet."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SplitError(f"{path}: not valid YAML ({exc}); restore it from git (`git checkout -- {path}`)") from exc
    return SubjectAssignment.from_dict(data, str(path))


def save_assignment(path: Path, assignment: SubjectAssignment) -> Path:
    from pipeline.atomic import atomic_write_text

    atomic_write_text(path, HEADER + yaml.safe_dump(assignment.to_dict(), sort_keys=False))
    return Path(path)


def check_recorded(path: Path, params: SplitParams, where: str) -> None:
    """Raise :class:`SplitError` when ``path`` holds a split whose rule the settings no longer match
    (nothing recorded yet is fine)."""
    recorded = load_assignment(path)
    if recorded is not None:
        check_rule(recorded, params, where)


def check_rule(assignment: SubjectAssignment, params: SplitParams, where: str) -> None:
    """Raise :class:`SplitError` when the settings no longer match the recorded rule."""
    differences = assignment.rule.differences(params)
    if differences:
        raise SplitError(
            f"{where}: the settings no longer match the recorded subject split ({'; '.join(differences)}). "
            "The split is never reshuffled silently: put the settings back, or change the split on purpose "
            "with `nerveseg data resplit --reason TEXT` (recorded, and the promotion gate then leaves out "
            "the subjects earlier models trained on)")


def adopt_prepared(frames_csv: Path, subjects: list[int], params: SplitParams) -> SubjectAssignment | None:
    """An assignment that keeps the split of an earlier preprocess (``data/prepared/frames.csv``), so
    the first recorded split of an existing workspace moves nobody.

    A table with a ``group`` column (prepared from a recorded split) gives its groups back. One made
    before splits were recorded is adopted only when the earlier rule (a seeded permutation of that
    data's subjects) reproduces its parts. Subjects the table did not hold are placed by the
    threshold. None when there is nothing to adopt."""
    frames_csv = Path(frames_csv)
    if not frames_csv.is_file():
        return None
    try:
        table = pd.read_csv(frames_csv)
    except (ValueError, OSError):
        return None
    if not {"subject", "split"} <= set(table.columns):
        return None
    if "group" in table.columns:  # prepared from a recorded split whose file is gone: keep its groups
        groups = {int(s): str(g) for s, g in table.groupby("subject")["group"].first().items()}
        if set(groups.values()) <= set(group_names(params.folds)):
            return SubjectAssignment(SplitRule.of(params), groups, method="adopted").extended(subjects)[0]
        return None
    earlier = {int(s): str(p) for s, p in table.groupby("subject")["split"].first().items()}
    if len(earlier) < 3:
        return None
    try:
        legacy = legacy_groups(sorted(earlier), params)
    except SplitError:
        return None
    if {s: part_of(g, params.fold) for s, g in legacy.items()} != earlier:
        return None
    adopted = SubjectAssignment(SplitRule.of(params), legacy, method="adopted")
    return adopted.extended(subjects)[0]


def ensure_assignment(path: Path, subjects: list[int], params: SplitParams,
                      adopt_from: Path | None = None) -> tuple[SubjectAssignment, list[int], bool]:
    """The recorded assignment covering ``subjects``: ``(assignment, newly placed subjects, created)``.

    Reads ``path``; checks that the settings match its rule; places subjects it does not hold by the
    rule. Without a file, makes the first assignment (adopting an earlier preprocess's split from
    ``adopt_from`` when possible). Writes nothing: :func:`save_assignment` does."""
    current = load_assignment(path)
    if current is None:
        made = adopt_prepared(adopt_from, subjects, params) if adopt_from else None
        made = made or create_assignment(subjects, params)
        return made, sorted(made.groups), True
    check_rule(current, params, str(path))
    extended, new = current.extended(subjects)
    return extended, new, False


def record_subjects(path: Path, subjects: list[int], params: SplitParams,
                    adopt_from: Path | None = None) -> tuple[SubjectAssignment, str | None]:
    """:func:`ensure_assignment`, and the file written when it placed anyone. Returns the assignment
    and a line saying who was placed where (None when nobody was)."""
    assignment, placed, created = ensure_assignment(path, subjects, params, adopt_from)
    if not placed:
        return assignment, None
    save_assignment(path, assignment)
    parts = list(assignment.parts(params.fold, placed).values())
    counts = ", ".join(f"{parts.count(p)} {p}" for p in PARTS)
    what = f"first assignment ({assignment.method}) of" if created else "placed"
    return assignment, f"subject split: {what} {len(placed)} subjects ({counts}); nobody already placed moved"


def resplit(assignment: SubjectAssignment | None, subjects: list[int], params: SplitParams, reason: str,
            on_behalf_of: str | None = None) -> tuple[SubjectAssignment, dict[int, tuple[str, str]]]:
    """A new assignment of every known subject by the settings' rule, recorded with who (the OS user,
    who also commits it; ``on_behalf_of`` beside it), when and why.
    Returns it and the subjects that changed group (``{subject: (before, after)}``)."""
    if not reason.strip():
        raise SplitError("a resplit needs a reason (--reason): it is recorded with the split")
    known = sorted(set(int(s) for s in subjects) | set(assignment.groups if assignment else {}))
    fresh = create_assignment(known, params)
    before = assignment.groups if assignment else {}
    moved = {s: (before[s], g) for s, g in fresh.groups.items() if s in before and before[s] != g}
    record = {"revision": (assignment.revision + 1) if assignment else 1,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **Identity(getpass.getuser(), OS_USER).fields(on_behalf_of),
              "reason": reason, "rule": fresh.rule.to_dict(), "method": fresh.method,
              "previous_digest": assignment.digest() if assignment else None,
              "moved": {int(s): f"{a} -> {b}" for s, (a, b) in sorted(moved.items())}}
    resplits = (assignment.resplits if assignment else ()) + (record,)
    return replace(fresh, revision=record["revision"], resplits=resplits), moved


def split_frames(frames: pd.DataFrame, assignment: SubjectAssignment, fold: int = 0) -> pd.DataFrame:
    """Add ``group`` (the recorded group) and ``split`` (the part for ``fold``) to a frame table."""
    subjects = frames["subject"].astype(int)
    missing = assignment.missing(subjects.unique().tolist())
    if missing:
        raise SplitError(f"subjects {missing} have no recorded part; run the preprocess stage, which places "
                         "new subjects by the recorded rule")
    out = frames.copy()
    out["group"] = subjects.map(assignment.groups)
    out["split"] = out["group"].map(lambda g: part_of(g, fold))
    empty = [p for p in PARTS if not (out["split"] == p).any()]
    if empty:
        raise SplitError(f"no subject of the data is in the {' or '.join(empty)} part of the recorded split "
                         f"(subjects present: {sorted(subjects.unique().tolist())}); add frames of more "
                         "subjects, or change the split on purpose with `nerveseg data resplit --reason TEXT`")
    return out


def fold_parts(frames: pd.DataFrame, fold: int, folds: int) -> np.ndarray:
    """Each prepared frame's part when fold ``fold`` of ``folds`` validates, from its recorded ``group``."""
    if "group" not in frames.columns:
        raise SplitError("the prepared frames carry no recorded subject group (prepared before splits were "
                         "recorded); run the preprocess stage again (dvc repro preprocess, or nerveseg run)")
    groups = set(frames["group"].astype(str))
    wanted = set(group_names(folds))
    if not groups <= wanted or (folds > 1 and groups != wanted):
        raise SplitError(f"the prepared frames were split into groups {sorted(groups)}, not the {folds} fold(s) of "
                         "split.folds; record a split with these folds (`nerveseg data resplit --reason ...`) and "
                         "run the preprocess stage again")
    return np.asarray([part_of(str(g), fold) for g in frames["group"]])


def subjects_by_part(frames: pd.DataFrame) -> dict[str, list[int]]:
    return {p: sorted(int(s) for s in frames.loc[frames["split"] == p, "subject"].unique()) for p in PARTS}


# --------------------------------------------------------------------------------------------
# The leak check: a subject in two parts would let training see frames that evaluation scores
# --------------------------------------------------------------------------------------------
class SubjectLeakError(ValueError):
    """A subject has frames in more than one of train, validation and holdout."""


def check_split(frames: pd.DataFrame) -> pd.DataFrame:
    """Subjects found in more than one part of a split (``subject``, ``split`` columns).

    Returns one row per leaking subject: ``subject``, ``parts`` ("holdout,train"), ``frames``
    (frame ids or image paths, when present). Empty when the split is clean.
    """
    if frames.empty:
        return pd.DataFrame(columns=["subject", "parts", "frames"])
    name = "frame_id" if "frame_id" in frames else ("image_path" if "image_path" in frames else None)
    rows = []
    for subject, group in frames.groupby("subject", sort=True):
        parts = sorted(set(group["split"].dropna().astype(str)))
        if len(parts) > 1:
            rows.append({
                "subject": subject,
                "parts": ",".join(parts),
                "frames": group[name].astype(str).tolist() if name else [],
            })
    return pd.DataFrame(rows, columns=["subject", "parts", "frames"])


def assert_no_subject_leak(frames: pd.DataFrame) -> None:
    """Raise :class:`SubjectLeakError` naming each subject found in two or more parts."""
    leaks = check_split(frames)
    if len(leaks):
        text = "; ".join(
            f"subject {r.subject} in {r.parts} ({', '.join(r.frames[:5])}"
            f"{' ...' if len(r.frames) > 5 else ''})" for r in leaks.itertuples()
        )
        raise SubjectLeakError(f"subjects in more than one of train, validation, holdout: {text}")


# --------------------------------------------------------------------------------------------
# The rule of splits made before they were recorded: kept to recover those models' splits
# --------------------------------------------------------------------------------------------
def deal(order: list[int], holdout_fraction: float, validation_fraction: float, folds: int) -> dict[int, str]:
    """Groups for subjects in a given order: the first ones to the holdout, the next to validation (or,
    with ``folds > 1``, the rest into fold groups), each part its share and at least one subject."""
    n = len(order)
    n_holdout = max(1, round(holdout_fraction * n))
    if folds > 1:
        if n - n_holdout < folds + 1:
            raise SplitError(f"{folds}-fold cross-validation needs at least {folds + 1} subjects outside the "
                             f"holdout, found {n - n_holdout}: lower split.folds or add subjects")
        groups = {s: "holdout" for s in order[:n_holdout]}
        for index, group in enumerate(fold_groups(order[n_holdout:], folds)):
            groups.update({s: f"fold{index}" for s in group})
        return groups
    n_validation = max(1, round(validation_fraction * n))
    if n_holdout + n_validation >= n:
        n_holdout, n_validation = 1, 1
    return {s: "holdout" if i < n_holdout else "validation" if i < n_holdout + n_validation else "train"
            for i, s in enumerate(order)}


def legacy_groups(subjects: list[int], params: SplitParams) -> dict[int, str]:
    """Groups as the earlier rule made them: a permutation seeded by ``split.seed`` of the subjects
    present, so every added subject could move every other (why it was replaced)."""
    unique = sorted(set(int(s) for s in subjects))
    if len(unique) < 3:
        raise SplitError(f"a subject split needs at least 3 subjects, found {len(unique)}")
    order = [int(s) for s in np.random.default_rng(params.seed).permutation(unique)]
    return deal(order, params.holdout_fraction, params.validation_fraction, params.folds)
