"""Register a trained model in MLflow and move the ``champion`` alias safely.

Order matters for operators: the version is registered and tagged; the challenger and the champion
are both loaded *from the registry* and scored on the same holdout frames (which also proves the new
version loads and runs); the decision and an event record are written as tags; only then does an
alias move. A crash at any point before that call leaves the previous champion in place. Manual
promotion and rollback follow the same order: load and run the model, record, then move.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import registry
from pipeline.config import Params
from pipeline.evaluate import load_native, load_postprocess
from pipeline.identity import Identity, acting_identity
from pipeline.inference import write_bundle
from pipeline.metrics import dice_per_frame
from pipeline.paths import ProjectPaths
from pipeline.preprocess import FRAMES
from pipeline.promotion import FrameScores, PromotionDecision, decide
from pipeline.checkpoints import WEIGHTS, load_model_config

EVENT_PREFIX = "event."
PREVIOUS_CHAMPION = "champion.previous_version"


class PromotionError(RuntimeError):
    """A version cannot become champion (it does not load or run, or there is nothing to roll back to)."""


def holdout_table(paths: ProjectPaths) -> pd.DataFrame:
    frames = pd.read_csv(paths.prepared_dir / FRAMES)
    return frames[frames.split == "holdout"].reset_index(drop=True)


def register_model(paths: ProjectPaths, params: Params, run_id: str, tags: dict[str, str],
                   metrics: dict[str, float]) -> str:
    """Log the trained bundle and the split it trained with (``split/split.json``, ``split.*`` tags: the
    subjects the gate must never score it on) to ``run_id`` and register it; returns the new version."""
    from pipeline.comparison import SPLIT_ARTIFACT, record_of_prepared

    split = record_of_prepared(paths.prepared_dir)
    client = registry.client()
    client.log_dict(run_id, split.to_dict(), SPLIT_ARTIFACT)
    for key, value in split.tags().items():
        client.set_tag(run_id, key, value)
    holdout = holdout_table(paths)
    example = load_native(paths.raw_dir, holdout.head(1))[0]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(
            Path(tmp) / "bundle",
            paths.models_dir / WEIGHTS,
            load_model_config(paths.models_dir),
            load_postprocess(paths.reports_dir),
        )
        model_uri = registry.log_model(run_id, bundle, example)
    version_tags = {**tags, **split.tags()}
    version_tags.update({
        f"holdout.{k}": f"{v:.6f}" for k, v in metrics.items() if isinstance(v, float) and not np.isnan(v)
    })
    return registry.register(model_uri, params.registry.model_name, version_tags)


def load_and_check(name: str, version: str, frame: np.ndarray | None = None):
    """Load a version from the registry and run it on one frame; raise PromotionError if either fails."""
    frame = np.zeros((420, 580), np.uint8) if frame is None else frame
    try:
        model = registry.load_model(f"models:/{name}/{version}")
        out = np.asarray(model.predict(frame[None]))
    except Exception as exc:  # any failure to load or run disqualifies the version
        raise PromotionError(f"{name} version {version} cannot be loaded and run: {exc}") from exc
    if out.shape != (1, *frame.shape):
        raise PromotionError(f"{name} version {version} returned masks of shape {out.shape} for one "
                             f"{frame.shape} frame")
    return model


def score_version(model, images: np.ndarray, masks: np.ndarray, frame_ids: list[str],
                  subjects: list[str] | None = None) -> FrameScores:
    pred = (np.asarray(model.predict(images)) > 0).astype(np.uint8)
    dice = dice_per_frame(pred, masks)
    has_nerve = masks.reshape(len(masks), -1).any(1)
    presence_ok = pred.reshape(len(pred), -1).any(1) == has_nerve
    return FrameScores(list(frame_ids), dice, presence_ok, has_nerve, subjects)


def record_event(name: str, version: str, action: str, reason: str, on_behalf_of: str | None = None,
                 identity: Identity | None = None, **evidence) -> dict:
    """An event on a version (promote, reject, rollback), kept as a version tag in the registry. The
    actor is who is acting (``pipeline.identity``); ``on_behalf_of`` is recorded beside it, never instead."""
    who = identity or acting_identity()
    event = {"action": action, "reason": reason, **who.fields(on_behalf_of),
             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **evidence}
    registry.set_tags(name, version, {f"{EVENT_PREFIX}{time.time_ns()}": json.dumps(event, default=str)})
    return event


def history(name: str) -> list[dict]:
    """Every recorded event on every version, oldest first."""
    events = []
    for info in registry.list_versions(name):
        for key, value in info.tags.items():
            if key.startswith(EVENT_PREFIX):
                events.append({"version": info.version, "at_ns": int(key.removeprefix(EVENT_PREFIX)),
                               **json.loads(value)})
    return sorted(events, key=lambda e: e["at_ns"])


def _move_champion(name: str, version: str, previous: str | None) -> None:
    registry.set_tags(name, version, {PREVIOUS_CHAMPION: previous or ""})
    registry.set_alias(name, registry.CHAMPION, version)
    challenger = registry.version_by_alias(name, registry.CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        registry.delete_alias(name, registry.CHALLENGER)


def promote(paths: ProjectPaths, params: Params, version: str) -> PromotionDecision:
    """The automatic gate of the flow: score both on the same holdout frames, record, then alias."""
    decision, evidence = gate(paths, params, version)
    return apply_decision(params.registry.model_name, version, decision, evidence)


def gate(paths: ProjectPaths, params: Params, version: str) -> tuple[PromotionDecision, dict]:
    """Score the version and the champion on the same frames and decide; the decision is written as
    tags on both versions. Records no event and moves no alias (:func:`apply_decision`).

    The frames are those of the current holdout subjects that neither version trained or validated
    on, as each version's recorded split says (:mod:`pipeline.comparison`), never today's settings.
    With none left, the challenger is scored on the whole current holdout (which it never saw) for
    the record, and the decision says that no comparison was possible."""
    from pipeline.comparison import comparison_set, version_split

    name = params.registry.model_name
    holdout = holdout_table(paths)
    current = registry.version_by_alias(name, registry.CHAMPION)
    champion_version = str(current.version) if current is not None and str(current.version) != version else None
    models = {f"challenger v{version}": version_split(name, version, paths.root)}
    if champion_version is not None:
        models[f"champion v{champion_version}"] = version_split(name, champion_version, paths.root)
    comparison, frames = comparison_set(holdout, models)
    scored = frames if len(frames) else holdout
    images, masks = load_native(paths.raw_dir, scored)
    frame_ids, subjects = scored["frame_id"].tolist(), scored["subject"].astype(str).tolist()
    challenger = score_version(load_and_check(name, version, images[0]), images, masks, frame_ids, subjects)
    champion = None
    if champion_version is not None and len(frames):
        champion = score_version(registry.load_model(f"models:/{name}/{champion_version}"), images, masks, frame_ids,
                                 subjects)

    tags = registry.client().get_model_version(name, version).tags
    validation_passed = tags.get(registry.TAG_VALIDATION) == "true"
    decision = decide(version, challenger, champion_version, champion, params.promotion, validation_passed,
                      comparison=comparison)
    registry.set_tags(name, version, decision.tags())
    evidence = {"challenger_dice": decision.challenger_dice, "champion_version": champion_version,
                "champion_dice": decision.champion_dice, "interval": [decision.interval_low, decision.interval_high],
                "data_hash": tags.get(registry.TAG_DATA_HASH), "validation_passed": validation_passed,
                "flow_run": tags.get(registry.TAG_FLOW_RUN), "n_frames": decision.n_frames,
                "resample": decision.resample, "n_subjects": decision.n_subjects,
                "challenger_nerve_dice": decision.challenger_nerve_dice,
                "empty_baseline_dice": decision.empty_baseline_dice,
                "comparison": {**comparison.to_dict(), "digest": comparison.digest(scored),
                               "splits": {label: {"source": r.source, "digest": r.digest}
                                          for label, r in models.items()}}}
    if champion_version is not None:
        scores = ("no subject unseen by both" if decision.champion_dice is None else
                  f"champion {decision.champion_dice:.6f}, challenger {decision.challenger_dice:.6f}")
        registry.set_tags(name, champion_version, {  # the decision on both versions
            "promotion.last_challenge": f"v{version}: {decision.tags()['promotion.decision']}",
            "promotion.last_challenge_reason": decision.reason,
            "promotion.last_challenge_scores": scores,
            "promotion.last_challenge_interval": decision.tags()["promotion.interval"],
        })
    return decision, evidence


def apply_decision(name: str, version: str, decision: PromotionDecision, evidence: dict) -> PromotionDecision:
    """Record the gate's decision in the ledger, then move ``champion`` (or set ``challenger``)."""
    record_event(name, version, "promote" if decision.promote else "reject", decision.reason, **evidence)
    if decision.promote:
        _move_champion(name, version, evidence.get("champion_version"))
    else:
        registry.set_alias(name, registry.CHALLENGER, version)
    return decision


APPROVAL_DECISIONS = ("approve", "reject", "timeout")


def await_approval(name: str, version: str, decision: PromotionDecision) -> None:
    """Mark a version that passed the gate as waiting for a person's decision (a tag, no alias)."""
    registry.set_tags(name, version, {"promotion.decision": "awaiting_approval",
                                      "promotion.gate_reason": decision.reason})


def apply_approval(name: str, version: str, decision: PromotionDecision, evidence: dict, answer: str,
                   reason: str, approver: Identity | None = None, on_behalf_of: str | None = None,
                   **approval) -> PromotionDecision:
    """A person's answer to a held promotion: ``approve`` promotes; ``reject`` and ``timeout`` do not
    (the version becomes ``challenger``). The answer, with who gave it and why, is recorded in the
    ledger first, with the gate's evidence, and only then does an alias move. The identity that moves
    the alias (the flow's own) is recorded too, as ``moved_by``."""
    from dataclasses import replace

    if answer not in APPROVAL_DECISIONS:
        raise ValueError(f"unknown approval answer {answer!r}; expected one of {APPROVAL_DECISIONS}")
    mover = acting_identity()
    approver = Identity("timeout", "timeout") if answer == "timeout" else (approver or mover)
    actor = approver.name
    promote_it = answer == "approve" and decision.promote
    final = replace(decision, promote=promote_it, alias="champion" if promote_it else "challenger",
                    reason=f"{'approved' if promote_it else 'not approved'} by {actor}: {reason} "
                           f"(gate: {decision.reason})")
    registry.set_tags(name, version, {**final.tags(), "promotion.approval": answer,
                                      "promotion.approval_actor": actor, "promotion.approval_reason": reason})
    record_event(name, version, "promote" if promote_it else "reject", reason, on_behalf_of, approver,
                 approval={"answer": answer, "gate_reason": decision.reason, **approval},
                 moved_by=mover.name, **evidence)
    if promote_it:
        _move_champion(name, version, evidence.get("champion_version"))
    else:
        registry.set_alias(name, registry.CHALLENGER, version)
    return final


def manual_promote(name: str, version: str, reason: str, on_behalf_of: str | None = None) -> dict:
    """An operator's promotion: the version must load and run; the move is recorded first. A person
    may overrule the gate (its floor included); the event then records the gate's refusal beside the
    person's reason (``overrules_gate``), so the ledger shows a deliberate override, not a gap."""
    if not reason.strip():
        raise PromotionError("a manual promotion needs a reason (--reason)")
    tags = registry.client().get_model_version(name, version).tags or {}  # raises if the version does not exist
    load_and_check(name, version)
    current = registry.version_by_alias(name, registry.CHAMPION)
    previous = str(current.version) if current is not None else None
    if previous == version:
        raise PromotionError(f"{name} version {version} is already the champion")
    refused = tags.get("promotion.reason", "") if tags.get("promotion.decision") == "not_promoted" else ""
    event = record_event(name, version, "promote", reason, on_behalf_of, manual=True, previous_champion=previous,
                         overrules_gate=refused)
    _move_champion(name, version, previous)
    return event


def rollback(name: str, reason: str, on_behalf_of: str | None = None) -> dict:
    """Give ``champion`` back to the version it replaced, after checking that version still runs."""
    current = registry.version_by_alias(name, registry.CHAMPION)
    if current is None:
        raise PromotionError(f"{name} has no champion to roll back")
    previous = (current.tags or {}).get(PREVIOUS_CHAMPION, "")
    if not previous:
        raise PromotionError(f"{name} version {current.version} replaced no earlier champion; nothing to roll back to")
    load_and_check(name, previous)
    event = record_event(name, previous, "rollback", reason or "rollback", on_behalf_of, replaced=str(current.version))
    # The restored champion keeps its own predecessor, so a second rollback goes further back.
    registry.set_alias(name, registry.CHAMPION, previous)
    return event


def expected_champion(name: str) -> str | None:
    """The version the recorded moves say is champion (the last promote or rollback target)."""
    moves = [e for e in history(name) if e["action"] in ("promote", "rollback")]
    return moves[-1]["version"] if moves else None


def unrecorded_alias_move(name: str) -> str | None:
    """A message when ``champion`` points somewhere no recorded move put it, else None."""
    current = registry.version_by_alias(name, registry.CHAMPION)
    current = None if current is None else str(current.version)
    expected = expected_champion(name)
    if current == expected:
        return None
    return (f"the alias champion points at version {current or 'nothing'}, but the last recorded move set "
            f"version {expected or 'nothing'}: it was moved outside nerveseg's commands")
