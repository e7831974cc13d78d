"""Lineage of a registered model version: run, code, parameters, data version, validation,
holdout metrics and promotion history, in one record."""

from __future__ import annotations

import re

from pipeline import registry
from pipeline.identity import describe
from pipeline.metrics import presence_caveat, presence_statement

URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class AuditError(ValueError):
    pass


def resolve(uri: str, default_name: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (or a bare version) -> (name, version)."""
    if uri.isdigit():
        return default_name, uri
    match = URI.match(uri)
    if not match:
        raise AuditError(f"{uri!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or a version number")
    name = match["name"]
    if match["version"]:
        return name, match["version"]
    found = registry.version_by_alias(name, match["alias"])
    if found is None:
        raise AuditError(f"{name} has no version with the alias {match['alias']!r}")
    return name, str(found.version)


def lineage(uri: str, default_name: str, root=None) -> dict:
    """``root``: the project, whose git history and DVC cache recover the split of a version registered
    before splits were recorded (:mod:`pipeline.comparison`)."""
    from pipeline.comparison import version_split
    from pipeline.release import history, unrecorded_alias_move

    name, version = resolve(uri, default_name)
    client = registry.client()
    try:
        mv = client.get_model_version(name, version)
    except Exception as exc:  # MLflow raises RestException/MlflowException for a missing version
        raise AuditError(f"{name} version {version} not found: {exc}") from exc
    tags = dict(mv.tags or {})
    run = client.get_run(mv.run_id) if mv.run_id else None
    aliases = registry.client().get_registered_model(name).aliases or {}
    events = [e for e in history(name) if e["version"] == version
              or str(e.get("previous_champion")) == version or str(e.get("replaced")) == version
              or str(e.get("champion_version")) == version]
    return {
        "model": name,
        "version": version,
        "aliases": sorted(a for a, v in aliases.items() if str(v) == version),
        "source": mv.source,
        "run": {
            "id": mv.run_id,
            "name": run.info.run_name if run else None,
            "status": run.info.status if run else None,
            "artifact_uri": run.info.artifact_uri if run else None,
        },
        "code": {"git_commit": tags.get(registry.TAG_CODE_REV), "dirty": tags.get(registry.TAG_CODE_DIRTY)},
        "parameters": dict(run.data.params) if run else {},
        "params_hash": tags.get(registry.TAG_PARAMS_HASH),
        "prefect_flow_run_id": tags.get(registry.TAG_FLOW_RUN),
        "data": {
            "dvc_hash": tags.get(registry.TAG_DATA_HASH),
            "dvc_file": tags.get(registry.TAG_DATA_FILE),
            "git_revision": tags.get(registry.TAG_DATA_REV),
            "n_frames": tags.get("data.n_frames"),
            "n_subjects": tags.get("data.n_subjects"),
            "empty_share": tags.get("data.empty_share"),
        },
        "validation": {"success": tags.get(registry.TAG_VALIDATION), "data_docs": tags.get("validation.data_docs")},
        "split": version_split(name, version, root).to_dict(),
        "environment": {k.removeprefix("env."): v for k, v in tags.items() if k.startswith("env.")},
        "nerveseg_version": tags.get(registry.TAG_PRODUCT_VERSION),
        "presence": _presence_counts(tags),
        "retrain_reason": tags.get("retrain.reason"),
        "holdout": {k.removeprefix("holdout."): float(v) for k, v in tags.items() if k.startswith("holdout.")},
        "promotion": {k.removeprefix("promotion."): v for k, v in tags.items() if k.startswith("promotion.")},
        "history": [{k: v for k, v in e.items() if k != "at_ns"} for e in events],
        "warnings": [w for w in [unrecorded_alias_move(name), presence_statement(_presence_counts(tags)),
                                 _presence_caveat(tags)] if w],
    }


def presence_line(counts: dict | None) -> str:
    """``trained on 3 of 120 frames without a nerve, scored on 10 of 40``."""
    if not counts:
        return "frames without a nerve trained and scored on: not recorded (registered before they were)"
    return (f"trained on {counts.get('train_empty_frames', '?')} of {counts.get('train_frames', '?')} frames without a "
            f"nerve, scored on {counts.get('holdout_empty_frames', '?')} of {counts.get('holdout_frames', '?')}")


def _presence_counts(tags: dict) -> dict[str, int] | None:
    """Frames and frames without a nerve trained and scored on; None for versions registered before."""
    counts = {k.removeprefix(registry.PRESENCE_PREFIX): v for k, v in tags.items()
              if k.startswith(registry.PRESENCE_PREFIX)}
    try:
        return {k: int(v) for k, v in counts.items()} or None
    except ValueError:
        return None


def _presence_caveat(tags: dict) -> str | None:
    def number(key: str) -> float | None:
        try:
            return float(tags[key])
        except (KeyError, ValueError):
            return None

    return presence_caveat(number("holdout.empty_baseline_dice"), number("holdout.n_frames"))


def _subjects(ids: list) -> str:
    return ", ".join(str(s) for s in ids) or "-"


def split_lines(record: dict) -> list[str]:
    """The subjects the version trained, validated and was scored on, and its last gate's comparison set."""
    sp, p = record["split"], record["promotion"]
    lines = [f"  split:       {sp['source']}" + (f" (digest {sp['digest']}, revision {sp['revision']})" if sp["digest"]
                                                  else "") + (f"; {sp['note']}" if sp.get("note") else ""),
             f"    train:      {len(sp['train'])} subjects: {_subjects(sp['train'])}",
             f"    validation: {len(sp['validation'])} subjects: {_subjects(sp['validation'])}",
             f"    holdout:    {len(sp['holdout'])} subjects: {_subjects(sp['holdout'])}"]
    if p.get("comparison_n_subjects"):
        lines.append(f"  gate:        scored on {p['comparison_n_subjects']} of {p.get('holdout_n_subjects', '?')} "
                     f"holdout subjects ({p.get('n_frames', '?')} frames: {p.get('comparison_subjects', '')}) unseen by "
                     f"{'both models' if p.get('champion_version') else 'the model'}; left out: "
                     f"{p.get('excluded_subjects', 'none')}")
    env = record.get("environment") or {}
    if env:
        lines.append(f"  environment: torch {env.get('torch')}, Python {env.get('python')}, {env.get('device')}, "
                     f"{env.get('precision')}, lock {env.get('lock_digest')}")
    return lines


def to_text(record: dict) -> str:
    d, v, h = record["data"], record["validation"], record["holdout"]
    lines = [
        f"{record['model']} version {record['version']}  aliases: {', '.join(record['aliases']) or '-'}",
        f"  run:         {record['run']['id']} ({record['run']['name']}, {record['run']['status']})",
        f"  code:        {record['code']['git_commit']} (dirty: {record['code']['dirty']}); "
        f"nerveseg {record.get('nerveseg_version') or 'not recorded'}",
        f"  parameters:  hash {record['params_hash']}, {len(record['parameters'])} values in the run",
        f"  data:        {d['dvc_hash']} ({d['dvc_file']} at {d['git_revision']}); "
        f"{d['n_frames']} frames, {d['n_subjects']} subjects, empty share {d['empty_share']}",
        f"  validation:  success {v['success']}; Data Docs {v['data_docs'] or '-'}",
        *split_lines(record),
        f"  no nerve:    {presence_line(record.get('presence'))}",
        "  holdout:     " + ", ".join(f"{k} {val:.4f}" for k, val in h.items()),
        f"  flow run:    {record['prefect_flow_run_id']}",
        "  history:",
    ]
    for event in record["history"] or [{"time": "-", "action": "none recorded", "version": "", "actor": "",
                                         "reason": ""}]:
        lines.append(f"    {event['time']}  {event['action']:<9} v{event['version']}  by {describe(event)}: "
                     f"{event['reason']}")
    lines += [f"  WARNING: {w}" for w in record.get("warnings", [])]
    return "\n".join(lines)
