"""One self-contained HTML page per registered version, for auditors: intended use and limits,
data version and its validation, training settings and code revision, holdout metrics overall and
per subject with intervals, pictures, and the promotion history."""

from __future__ import annotations

import base64
import html
import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import registry
from pipeline.identity import describe
from pipeline.audit import lineage, presence_line
from pipeline.atomic import atomic_write_text
from pipeline.metrics import FAILURES, presence_statement
from pipeline.promotion import paired_bootstrap

INTENDED_USE = (
    "Segments the brachial plexus in single B-mode ultrasound frames of the neck (420×580, 8-bit) to help "
    "a clinician performing ultrasound-guided regional anaesthesia see the nerve. It outlines where the "
    "nerve probably is, and says whether it sees one at all only as far as the section 'Frames without a "
    "nerve' shows it learnt to."
)
LIMITS = [
    "Decision support only: the clinician's own reading of the image decides where to inject.",
    "Trained and evaluated on the data version named below only; other probes, presets, depths or body "
    "sites are outside what it was checked on.",
    "Frames of one subject are correlated; metrics are on held-out subjects, and the interval over subjects "
    "is the one to trust; with fewer than about five holdout subjects no interval says much.",
    "A frame scored as 'no nerve' may still contain one (see presence accuracy and missed nerve frames).",
]
PICTURES = ("overlays.png", "threshold_curve.png", "training_curves.png")


def _table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    ) + "</table>"


def _frame_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v if isinstance(v, str) else f'{v:.4g}')}</td>" for v in row)
        + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _interval(values: np.ndarray, groups: np.ndarray | None = None) -> str:
    if len(values) == 0:
        return "n/a"
    mean, low, high = paired_bootstrap(values, 1000, 0.95, seed=0, groups=groups)
    return f"{mean:.4f} [{low:.4f}, {high:.4f}]"


def _artifacts(run_id: str | None) -> dict[str, Path]:
    """Download the run's evaluation artifacts (pictures, per-frame table) into a temp folder."""
    if not run_id:
        return {}
    import mlflow

    target = Path(tempfile.mkdtemp(prefix="nerveseg-card-"))
    try:
        # the run's artifact root, read once: by run id, MLflow reads the whole run again for every file
        root = mlflow.MlflowClient().get_run(run_id).info.artifact_uri.rstrip("/")
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/evaluation", dst_path=str(target)))
    except Exception:  # a run without evaluation artifacts still gets a card
        return {}
    return {p.name: p for p in local.iterdir()}


def _split_section(record: dict) -> str:
    """Which subjects trained, validated and scored the model, and what its last gate compared on."""
    sp, p = record["split"], record["promotion"]
    rows = [("how the split is known", sp["source"] + (f": {sp['note']}" if sp.get("note") else "")),
            ("recorded split (data/split.yaml)", f"digest {sp['digest']}, revision {sp['revision']}" if sp["digest"]
             else "not recorded")]
    rows += [(f"{part} subjects ({len(sp[part])})", ", ".join(str(x) for x in sp[part]) or "-")
             for part in ("train", "validation", "holdout")]
    if p.get("comparison_n_subjects"):
        rows += [("last promotion gate: scored on",
                  f"{p['comparison_n_subjects']} of the {p.get('holdout_n_subjects', '?')} current holdout subjects "
                  f"({p.get('n_frames', '?')} frames): {p.get('comparison_subjects', '')}"),
                 ("left out (seen by a model compared)", p.get("excluded_subjects", "none"))]
    return _table(rows)


def build_card(uri: str, default_name: str, root: Path | None = None) -> str:
    record = lineage(uri, default_name, root)
    files = _artifacts(record["run"]["id"])
    per_frame = pd.read_csv(files["holdout_frames.csv"]) if "holdout_frames.csv" in files else None

    metrics_rows = [(k, f"{v:.4f}") for k, v in record["holdout"].items()]
    subject_html = "<p>No per-frame results were logged with this version.</p>"
    if per_frame is not None:
        dice = per_frame["dice"].to_numpy()
        metrics_rows[:0] = [("Dice, 95 % bootstrap interval over frames", _interval(dice)),
                            # the honester one: a subject's frames are near-duplicates, not new draws
                            (f"Dice, 95 % bootstrap interval over the {per_frame['subject'].nunique()} subjects",
                             _interval(dice, per_frame["subject"].astype(str).to_numpy()))]
        rows = []
        for subject, group in per_frame.groupby("subject"):
            rows.append({"subject": str(subject), "frames": len(group),
                         "nerve frames": int((group["true_area"] > 0).sum()),
                         "Dice [95 % interval]": _interval(group["dice"].to_numpy()),
                         "IoU": float(group["iou"].mean()),
                         # versions evaluated before outcomes were recorded have no such column
                         **({"failed frames": int(group["outcome"].isin(FAILURES).sum())}
                            if "outcome" in group else {})})
        subject_html = _frame_table(pd.DataFrame(rows))

    pictures = ""
    for name in PICTURES:
        if name in files:
            data = base64.b64encode(files[name].read_bytes()).decode()
            pictures += f'<figure><img src="data:image/png;base64,{data}" alt="{name}"><figcaption>' \
                        f"{html.escape(name.removesuffix('.png').replace('_', ' '))}</figcaption></figure>"
    history = "".join(
        f"<tr><td>{html.escape(e['time'])}</td><td>{html.escape(e['action'])}</td>"
        f"<td>v{html.escape(e['version'])}"
        f"</td><td>{html.escape(describe(e))}</td><td>{html.escape(str(e['reason']))}</td></tr>"
        for e in record["history"]
    ) or "<tr><td colspan=5>no recorded moves</td></tr>"
    d, v = record["data"], record["validation"]
    params = io.StringIO()
    for key in sorted(record["parameters"]):
        params.write(f"<tr><th>{html.escape(key)}</th><td>{html.escape(record['parameters'][key])}</td></tr>")
    warnings = "".join(f"<p class=warn>{html.escape(w)}</p>" for w in record.get("warnings", []))

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Model card: {html.escape(record['model'])} v{record['version']}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; color: #222; max-width: 1100px; padding: 0 1em; }}
h1 {{ margin-bottom: 0.2em; }} .sub {{ color: #666; margin-top: 0; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.2em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; font-weight: 600; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
.warn {{ background: #fff3cd; padding: 0.5em; border: 1px solid #e0c36c; }}
details table {{ font-size: 0.85em; }}
</style></head><body>
<h1>Model card: {html.escape(record['model'])} version {record['version']}</h1>
<p class=sub>aliases: {html.escape(', '.join(record['aliases']) or 'none')} ·
run {html.escape(str(record['run']['id']))}</p>
{warnings}
<section id="intended-use"><h2>Intended use</h2><p>{html.escape(INTENDED_USE)}</p>
<h3>Limits</h3><ul>{''.join(f'<li>{html.escape(x)}</li>' for x in LIMITS)}</ul></section>
<section id="data"><h2>Data version and validation</h2>{_table([
    ("DVC hash of data/raw", d['dvc_hash']),
    (".dvc file and git revision", f"{d['dvc_file']} @ {d['git_revision']}"),
    ("frames / subjects", f"{d['n_frames']} / {d['n_subjects']}"),
    ("share of frames without a nerve", d['empty_share']),
    ("data validation passed", v['success']), ("Data Docs", v['data_docs'] or 'n/a')])}</section>
<section id="no-nerve"><h2>Frames without a nerve</h2>
<p>{html.escape(presence_line(record.get('presence')))}.</p>
{'<p class=warn>' + html.escape(presence_statement(record.get('presence')) or '') + '.</p>'
 if presence_statement(record.get('presence')) else ''}</section>
<section id="subjects"><h2>Subjects: trained on, validated on, scored on</h2>
<p>No subject is in two parts. The promotion gate scores models only on current holdout subjects that none of
the models compared trained or validated on, as each version's recorded split says.</p>
{_split_section(record)}</section>
<section id="training"><h2>Training settings and code</h2>{_table([
    ("code commit", record['code']['git_commit']), ("uncommitted changes", record['code']['dirty']),
    ("nerveseg release", record.get('nerveseg_version') or 'not recorded'),
    ("settings hash", record['params_hash']), ("Prefect flow run", record['prefect_flow_run_id'])])}
<details><summary>all {len(record['parameters'])} settings</summary>
<table>{params.getvalue()}</table></details></section>
<section id="metrics"><h2>Holdout metrics</h2><p>Subjects the model never saw, at native resolution.</p>
{_table(metrics_rows)}<h3>Per subject</h3>{subject_html}</section>
<section id="pictures"><h2>Best and worst frames, threshold curve, training</h2>
{pictures or '<p>none logged</p>'}</section>
<section id="history"><h2>Promotion history</h2>
<table><tr><th>time</th><th>action</th><th>version</th><th>actor</th><th>reason</th></tr>{history}</table></section>
</body></html>
"""


def write_card(uri: str, default_name: str, out: Path, root: Path | None = None) -> Path:
    atomic_write_text(out, build_card(uri, default_name, root))
    return Path(out)


def log_card(name: str, version: str, run_id: str, root: Path | None = None) -> str:
    """Log the version's card to its run and point a version tag at it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_card(f"models:/{name}/{version}", name, Path(tmp) / f"model_card_v{version}.html", root)
        registry.client().log_artifact(run_id, str(path), "model_card")
    location = f"model_card/model_card_v{version}.html"
    registry.set_tags(name, version, {"model_card": location})
    return location
