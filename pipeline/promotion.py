"""The promotion gate. The challenger takes ``champion`` only when, on the **same holdout frames**:

- a paired bootstrap of the per-frame Dice difference (challenger − champion) gives an interval whose
  lower bound is above ``promotion.margin``; it resamples frames, or whole subjects
  (``promotion.resample: subject``), since one subject's frames are not independent draws;
- its presence accuracy does not drop by more than ``promotion.presence_tolerance``;
- the data validation of its data version passed.

Every promotion, the first one included, must also clear an absolute floor: Dice on the holdout's nerve
frames of at least ``promotion.min_nerve_dice``, and a holdout Dice above what predicting "no nerve"
on every frame scores (the share of empty frames) by more than ``promotion.min_gain_over_empty``. A
model that never finds a nerve, or that raises false alarms on a whole subject, can otherwise look
good on a holdout where most frames are empty (docs/operations.md, "The floor"). Without a champion,
the first valid model that clears the floor becomes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from pipeline.config import PromotionParams
from pipeline.metrics import empty_baseline_dice


@dataclass(frozen=True)
class FrameScores:
    """One model's per-frame results on an ordered list of frames."""

    frame_ids: list[str]
    dice: np.ndarray           # competition Dice per frame
    presence_ok: np.ndarray    # predicted presence agrees with the truth, per frame
    has_nerve: np.ndarray      # the truth holds a nerve, per frame
    subjects: list[str] | None = None  # each frame's subject, for resampling whole subjects

    @property
    def mean_dice(self) -> float:
        return float(np.mean(self.dice))

    @property
    def presence_accuracy(self) -> float:
        return float(np.mean(self.presence_ok))

    @property
    def nerve_dice(self) -> float | None:
        """Mean Dice over the frames that hold a nerve; None when there are none."""
        nerve = np.asarray(self.has_nerve, bool)
        return float(np.mean(self.dice[nerve])) if nerve.any() else None

    @property
    def empty_baseline_dice(self) -> float:
        return empty_baseline_dice(self.has_nerve)


def paired_bootstrap(diff: np.ndarray, resamples: int, confidence: float, seed: int,
                     groups: list[str] | np.ndarray | None = None) -> tuple[float, float, float]:
    """Mean of ``diff`` and its percentile bootstrap interval: frames resampled with replacement, or
    with ``groups`` (each frame's subject) whole groups, the mean still taken over their frames."""
    diff = np.asarray(diff, float)
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
        means = diff[idx].mean(axis=1)
    else:
        _, group = np.unique(np.asarray(groups), return_inverse=True)
        sums, counts = np.bincount(group, weights=diff), np.bincount(group).astype(float)
        idx = rng.integers(0, len(sums), size=(resamples, len(sums)))
        means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1 - confidence) / 2
    return float(diff.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    alias: str                          # what the challenger receives: champion or challenger
    reason: str
    challenger_version: str
    challenger_dice: float
    challenger_presence_accuracy: float
    champion_version: str | None
    champion_dice: float | None         # the champion re-scored on the challenger's holdout frames
    champion_presence_accuracy: float | None
    dice_difference: float | None
    interval_low: float | None
    interval_high: float | None
    confidence: float
    resamples: int
    margin: float
    validation_passed: bool
    n_frames: int
    resample: str = "frame"             # what the bootstrap drew: frame or subject
    n_subjects: int | None = None       # holdout subjects, where the scores name them
    advice: str = ""                    # a note for the operator that does not change the decision
    challenger_nerve_dice: float | None = None  # its Dice on the holdout's nerve frames
    empty_baseline_dice: float | None = None    # the holdout Dice of predicting no nerve anywhere
    min_nerve_dice: float = 0.0
    min_gain_over_empty: float = -1.0
    # The comparison set (pipeline.comparison): the current holdout subjects that neither model trained
    # or validated on, as each version's recorded split says; None where the gate did not compute one.
    comparison_subjects: list[int] | None = None
    holdout_subjects: list[int] | None = None
    excluded_subjects: dict[str, str] | None = None  # holdout subject -> why it was left out
    min_comparison_subjects: int = 1

    @property
    def leaves_no_champion(self) -> bool:
        """Not promoted, and there was no champion to keep (the floor refused a first model)."""
        return not self.promote and self.champion_version is None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PromotionDecision:
        """The decision back from :meth:`to_dict`'s form; other keys a flow result adds are ignored."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def tags(self) -> dict[str, str]:
        def f(value) -> str:
            return "" if value is None else (f"{value:.6f}" if isinstance(value, float) else str(value))

        return {
            "promotion.decision": "promoted" if self.promote else "not_promoted",
            "promotion.reason": self.reason,
            "promotion.challenger_dice": f(self.challenger_dice),
            "promotion.champion_version": f(self.champion_version),
            "promotion.champion_dice_same_frames": f(self.champion_dice),
            "promotion.dice_difference": f(self.dice_difference),
            "promotion.interval": "" if self.interval_low is None else
            f"[{self.interval_low:.6f}, {self.interval_high:.6f}] at {self.confidence:g}",
            "promotion.n_frames": str(self.n_frames),
            "promotion.resample": self.resample,
            "promotion.n_subjects": f(self.n_subjects),
            "promotion.challenger_nerve_dice": f(self.challenger_nerve_dice),
            "promotion.empty_baseline_dice": f(self.empty_baseline_dice),
            **({} if self.comparison_subjects is None else {
                "promotion.comparison_subjects": ",".join(str(x) for x in self.comparison_subjects)[:4000],
                "promotion.comparison_n_subjects": str(len(self.comparison_subjects)),
                "promotion.holdout_n_subjects": str(len(self.holdout_subjects or [])),
                "promotion.excluded_subjects": self.excluded_text()[:4000],
            }),
        }

    def excluded_text(self) -> str:
        return "; ".join(f"{s}: {why}" for s, why in (self.excluded_subjects or {}).items()) or "none"

    def comparison_line(self) -> str | None:
        """How many holdout subjects judged the models, and which were left out and why."""
        if self.comparison_subjects is None:
            return None
        n, total = len(self.comparison_subjects), len(self.holdout_subjects or [])
        both = "neither model" if self.champion_version is not None else "the model never"
        line = (f"Scored on {n} of the {total} current holdout subjects ({self.n_frames} frames) that {both} "
                f"trained or validated on (each version's recorded split)")
        if self.excluded_subjects:
            line += f"; left out: {self.excluded_text()}"
        return line + "."

    def _unit(self) -> str:
        return f"{self.n_subjects} subjects" if self.resample == "subject" else f"{self.n_frames} frames"

    def to_markdown(self) -> str:
        verdict = "**promoted** to `champion`" if self.promote else "kept as `challenger`"
        lines = [f"### Promotion decision\n\nVersion {self.challenger_version} {verdict}.\n",
                 f"| on the same {self.n_frames} holdout frames | Dice | presence accuracy |", "|---|---|---|",
                 f"| challenger v{self.challenger_version} | {self.challenger_dice:.4f} | "
                 f"{self.challenger_presence_accuracy:.4f} |"]
        if self.champion_version is not None and self.champion_dice is None:
            lines.append(f"| champion v{self.champion_version} | not scored: no subject unseen by both | |")
        elif self.champion_version is not None:
            lines.append(f"| champion v{self.champion_version} | {self.champion_dice:.4f} | "
                         f"{self.champion_presence_accuracy:.4f} |")
            lines.append(f"\nDice difference {self.dice_difference:+.4f}, {self.confidence:.0%} interval "
                         f"[{self.interval_low:+.4f}, {self.interval_high:+.4f}] ({self.resamples} paired "
                         f"bootstrap resamples of the {self._unit()}), margin {self.margin:g}.")
        if self.empty_baseline_dice is not None:
            nerve = "none in the holdout" if self.challenger_nerve_dice is None else f"{self.challenger_nerve_dice:.4f}"
            lines.append(f"\nFloor: Dice on the nerve frames {nerve} (at least {self.min_nerve_dice:g}); "
                         f"predicting no nerve anywhere would score {self.empty_baseline_dice:.4f} "
                         f"(the challenger must beat it by more than {self.min_gain_over_empty:g}).")
        if self.comparison_line():
            lines.append(f"\n{self.comparison_line()}")
        lines.append(f"\nReason: {self.reason}\n")
        if self.advice:
            lines.append(f"Note: {self.advice}\n")
        return "\n".join(lines)


def floor_failure(scores: FrameScores, params: PromotionParams) -> str | None:
    """Why a model is not fit to be champion whatever it is compared with, or None if it clears the floor."""
    return floor_check(scores.mean_dice, scores.nerve_dice, int(np.sum(scores.has_nerve)),
                       scores.empty_baseline_dice, params)


def floor_check(mean_dice: float, nerve_dice: float | None, n_nerve: int, empty_baseline: float,
                params: PromotionParams) -> str | None:
    """The floor on a holdout's summary: Dice over all frames, over the ``n_nerve`` nerve frames, and
    the Dice of predicting no nerve anywhere (the share of empty frames)."""
    if params.min_nerve_dice > 0:
        if nerve_dice is None:
            return (f"the holdout has no frame with a nerve, so promotion.min_nerve_dice {params.min_nerve_dice:g} "
                    f"cannot be checked; hold out subjects whose frames show the nerve")
        if nerve_dice < params.min_nerve_dice:
            return (f"below the floor: Dice {nerve_dice:.4f} on the holdout's {n_nerve} nerve frames, under "
                    f"promotion.min_nerve_dice {params.min_nerve_dice:g} (it rarely finds the nerve)")
    gain = mean_dice - empty_baseline
    if gain <= params.min_gain_over_empty:
        return (f"below the floor: holdout Dice {mean_dice:.4f} against {empty_baseline:.4f} for predicting no "
                f"nerve on any frame, a gain of {gain:+.4f}, not above promotion.min_gain_over_empty "
                f"{params.min_gain_over_empty:g} (false alarms on empty frames, or missed nerves)")
    return None


def decide(challenger_version: str, challenger: FrameScores, champion_version: str | None,
           champion: FrameScores | None, params: PromotionParams, validation_passed: bool,
           comparison=None) -> PromotionDecision:
    """``comparison`` (:class:`pipeline.comparison.Comparison`): the subjects both sets of scores are
    on; with fewer than ``promotion.min_comparison_subjects`` nothing is promoted (``champion`` may
    then be None although there is a champion: it could not be scored on unseen subjects)."""
    if champion is not None and champion.frame_ids != challenger.frame_ids:
        raise ValueError("champion and challenger must be scored on the same frames, in the same order")
    if params.resample == "subject" and challenger.subjects is None:
        raise ValueError("promotion.resample: subject needs each holdout frame's subject")
    n_subjects = None if challenger.subjects is None else len(set(challenger.subjects))
    groups = challenger.subjects if params.resample == "subject" else None
    common = dict(
        challenger_version=challenger_version,
        challenger_dice=challenger.mean_dice,
        challenger_presence_accuracy=challenger.presence_accuracy,
        champion_version=champion_version,
        champion_dice=champion.mean_dice if champion else None,
        champion_presence_accuracy=champion.presence_accuracy if champion else None,
        confidence=params.confidence,
        resamples=params.bootstrap_resamples,
        margin=params.margin,
        validation_passed=validation_passed,
        n_frames=len(challenger.frame_ids),
        resample=params.resample,
        n_subjects=n_subjects,
        challenger_nerve_dice=challenger.nerve_dice,
        empty_baseline_dice=challenger.empty_baseline_dice,
        min_nerve_dice=params.min_nerve_dice,
        min_gain_over_empty=params.min_gain_over_empty,
        min_comparison_subjects=params.min_comparison_subjects,
    )
    too_few = None
    if comparison is not None:
        common.update(comparison_subjects=list(comparison.subjects), holdout_subjects=list(comparison.holdout_subjects),
                      excluded_subjects={str(k): v for k, v in sorted(comparison.excluded.items())})
        if len(comparison.subjects) < params.min_comparison_subjects:
            rival = "the champion nor the challenger" if champion_version is not None else "the model"
            too_few = (f"only {len(comparison.subjects)} of the {len(comparison.holdout_subjects)} current holdout "
                       f"subjects are unseen by {rival} (left out: {comparison.excluded_text()}), fewer than "
                       f"promotion.min_comparison_subjects {params.min_comparison_subjects}: no comparison on unseen "
                       "subjects is possible; add subjects (new ones join the holdout at its share) or promote "
                       "by hand with a reason")
    if params.resample == "frame" and champion is not None and n_subjects is not None and n_subjects >= params.min_subjects:
        # Measured on real folds (docs/operations.md): the frame bootstrap promoted a same-recipe retrain 8 times in 30.
        common["advice"] = (
            f"the interval resamples frames, but the frames of one subject are near-duplicates; with "
            f"{n_subjects} holdout subjects, promotion.resample: subject gives an honest interval "
            f"(docs/operations.md, 'How sure the gate is, on real data')")
    if champion is None or too_few:
        mean = low = high = None
    else:
        mean, low, high = paired_bootstrap(challenger.dice - champion.dice, params.bootstrap_resamples,
                                           params.confidence, params.seed, groups)
    common.update(dice_difference=mean, interval_low=low, interval_high=high)

    below_floor = floor_failure(challenger, params)
    if not validation_passed:
        promote, reason = False, "the data validation of this data version did not pass"
    elif too_few:
        promote, reason = False, too_few
    elif below_floor:
        promote, reason = False, below_floor
    elif champion is None:
        nerve = "n/a" if challenger.nerve_dice is None else f"{challenger.nerve_dice:.4f}"
        promote, reason = True, ("no champion yet: the first valid model that clears the floor becomes champion "
                                 f"(nerve-frame Dice {nerve}, holdout Dice {challenger.mean_dice:.4f} "
                                 f"against {challenger.empty_baseline_dice:.4f} for predicting no nerve)")
    elif groups is not None and n_subjects < params.min_subjects:
        # Resampling two or three subjects gives an interval that says nothing (one: no width at all).
        promote, reason = False, (
            f"the holdout has {n_subjects} subjects, fewer than promotion.min_subjects {params.min_subjects} "
            f"that promotion.resample: subject needs; hold out more subjects (split.holdout_fraction) or "
            f"resample frames"
        )
    elif low <= params.margin:
        promote, reason = False, (
            f"not measurably better: Dice difference {mean:+.4f}, {params.confidence:.0%} interval "
            f"[{low:+.4f}, {high:+.4f}] does not lie above the margin {params.margin:g}"
        )
    elif challenger.presence_accuracy < champion.presence_accuracy - params.presence_tolerance:
        promote, reason = False, (
            f"presence accuracy drops from {champion.presence_accuracy:.4f} to {challenger.presence_accuracy:.4f}, "
            f"beyond the tolerance {params.presence_tolerance:g}"
        )
    else:
        promote, reason = True, (
            f"better on the same {len(challenger.frame_ids)} frames: Dice {challenger.mean_dice:.4f} vs "
            f"{champion.mean_dice:.4f}, difference {mean:+.4f}, {params.confidence:.0%} interval "
            f"[{low:+.4f}, {high:+.4f}] above the margin {params.margin:g}"
        )
    return PromotionDecision(promote=promote, alias="champion" if promote else "challenger", reason=reason, **common)
