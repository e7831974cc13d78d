"""A self-contained HTML evaluation report (pictures embedded), for MLflow and Prefect artifacts."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_write_text
from pipeline.inference import Postprocess

METRIC_NAMES = {
    "dice": "Dice (competition: 1 when both empty)",
    "iou": "IoU",
    "dice_nerve_frames": "Dice on frames with a nerve",
    "empty_baseline_dice": "Dice of predicting no nerve on any frame (the promotion floor's baseline)",
    "sensitivity": "pixel sensitivity",
    "specificity": "pixel specificity",
    "pixel_accuracy": "pixel accuracy",
    "presence_accuracy": "presence accuracy",
    "presence_auroc": "presence AUROC",
    "hd95_px": "95th-percentile Hausdorff distance (px, nerve frames)",
    "nerve_frames_missed": "nerve frames with no predicted mask (missed)",
    "nerve_frames_elsewhere": "nerve frames predicted only elsewhere (no overlap)",
    "nerve_frames_poor_overlap": "nerve frames found with Dice < 0.5",
    "false_alarms": "empty frames with a predicted mask (false alarms)",
    "n_frames": "frames",
    "n_subjects": "subjects",
}


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def _image(path: Path) -> str:
    if not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).stem)}">' \
           f"<figcaption>{html.escape(Path(path).stem.replace('_', ' '))}</figcaption></figure>"


def write_evaluation_report(path: Path, metrics: dict, subjects: pd.DataFrame, post: Postprocess,
                            pictures: list[Path]) -> None:
    rows = "".join(
        f"<tr><td>{html.escape(METRIC_NAMES.get(k, k))}</td><td>{_fmt(v)}</td></tr>" for k, v in metrics.items()
    )
    subject_rows = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in subjects.itertuples(index=False)
    )
    subject_head = "".join(f"<th>{html.escape(c)}</th>" for c in subjects.columns)
    post_rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in post.to_dict().items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Holdout evaluation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1300px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }}
td:first-child {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
figure {{ margin: 1em 0; }}
</style></head><body>
<h1>Holdout evaluation</h1>
<p>Frames of subjects the model never saw, scored at native resolution through the registered model's
inference path. Green outlines are the annotator's, red the model's.</p>
<h2>Metrics</h2><table>{rows}</table>
<h2>Post-processing frozen into the model</h2>
<p>Tuned on the validation subjects, then fixed.</p><table>{post_rows}</table>
<h2>Per subject</h2><table><tr>{subject_head}</tr>{subject_rows}</table>
<h2>Pictures</h2>{"".join(_image(p) for p in pictures)}
</body></html>
"""
    atomic_write_text(path, page)
