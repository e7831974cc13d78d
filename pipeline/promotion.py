"""The promotion rule: the challenger takes ``champion`` only when it beats the champion
**on the same holdout frames**; without a champion the first valid model becomes it."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    alias: str                       # the alias the challenger receives: champion or challenger
    reason: str
    metric: str
    challenger_version: str
    challenger_score: float
    champion_version: str | None
    champion_score: float | None     # the champion re-scored on the challenger's holdout frames
    n_frames: int

    def to_dict(self) -> dict:
        return asdict(self)

    def tags(self) -> dict[str, str]:
        return {
            "promotion.decision": "promoted" if self.promote else "not_promoted",
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.challenger_score": f"{self.challenger_score:.6f}",
            "promotion.champion_version": self.champion_version or "",
            "promotion.champion_score_same_frames": "" if self.champion_score is None else f"{self.champion_score:.6f}",
            "promotion.n_frames": str(self.n_frames),
        }

    def to_markdown(self) -> str:
        verdict = "**promoted** to `champion`" if self.promote else "kept as `challenger`"
        champion = (
            f"version {self.champion_version}: {self.champion_score:.4f}"
            if self.champion_version is not None and self.champion_score is not None
            else "none"
        )
        return (
            f"### Promotion decision\n\nVersion {self.challenger_version} {verdict}.\n\n"
            f"| | {self.metric} on the same {self.n_frames} holdout frames |\n|---|---|\n"
            f"| challenger (v{self.challenger_version}) | {self.challenger_score:.4f} |\n"
            f"| champion | {champion} |\n\nReason: {self.reason}\n"
        )


def decide(
    metric: str,
    challenger_version: str,
    challenger_score: float,
    champion_version: str | None,
    champion_score: float | None,
    n_frames: int,
    min_improvement: float = 0.0,
) -> PromotionDecision:
    if champion_version is None or champion_score is None:
        promote = True
        reason = "no champion yet: the first valid model becomes champion"
    elif challenger_score > champion_score + min_improvement:
        promote = True
        reason = (
            f"{metric} {challenger_score:.4f} beats the champion's {champion_score:.4f} on the same "
            f"{n_frames} frames by more than {min_improvement:g}"
        )
    else:
        promote = False
        reason = (
            f"{metric} {challenger_score:.4f} does not beat the champion's {champion_score:.4f} on the "
            f"same {n_frames} frames by more than {min_improvement:g}"
        )
    return PromotionDecision(
        promote=promote,
        alias="champion" if promote else "challenger",
        reason=reason,
        metric=metric,
        challenger_version=challenger_version,
        challenger_score=challenger_score,
        champion_version=champion_version,
        champion_score=champion_score,
        n_frames=n_frames,
    )
