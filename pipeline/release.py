"""Register a trained model in MLflow and decide its alias.

Order matters for operators: the version is registered and tagged, then the challenger and the
champion are both loaded *from the registry* and scored on the same holdout frames (which also
proves the new version loads and runs), the decision is written as tags on both versions, and
only then does an alias move. A crash at any point leaves the previous champion in place.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import registry
from pipeline.config import Params
from pipeline.evaluate import load_native, load_postprocess, score_frames
from pipeline.inference import write_bundle
from pipeline.metrics import summarise
from pipeline.paths import ProjectPaths
from pipeline.preprocess import FRAMES
from pipeline.promotion import PromotionDecision, decide
from pipeline.train import WEIGHTS, load_model_config


def holdout_table(paths: ProjectPaths) -> pd.DataFrame:
    frames = pd.read_csv(paths.prepared_dir / FRAMES)
    return frames[frames.split == "holdout"].reset_index(drop=True)


def register_model(paths: ProjectPaths, params: Params, run_id: str, tags: dict[str, str],
                   metrics: dict[str, float]) -> str:
    """Log the trained bundle to ``run_id`` and register it; returns the new version."""
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
    version_tags = dict(tags)
    version_tags.update({f"holdout.{k}": f"{v:.6f}" for k, v in metrics.items() if isinstance(v, float)})
    return registry.register(model_uri, params.registry.model_name, version_tags)


def _score_version(name: str, version: str, images: np.ndarray, masks: np.ndarray, holdout: pd.DataFrame,
                   metric: str) -> float:
    model = registry.load_model(f"models:/{name}/{version}")
    table = score_frames(model.predict, images, masks, holdout)
    return float(summarise(table.attrs.pop("pred"), masks)[metric])


def promote(paths: ProjectPaths, params: Params, version: str) -> PromotionDecision:
    name, metric = params.registry.model_name, params.promotion.metric
    holdout = holdout_table(paths)
    images, masks = load_native(paths.raw_dir, holdout)
    challenger_score = _score_version(name, version, images, masks, holdout, metric)

    current = registry.version_by_alias(name, registry.CHAMPION)
    champion_version = str(current.version) if current is not None and str(current.version) != version else None
    champion_score = None
    if champion_version is not None:
        champion_score = _score_version(name, champion_version, images, masks, holdout, metric)

    decision = decide(metric, version, challenger_score, champion_version, champion_score, len(holdout),
                      params.promotion.min_improvement)
    registry.set_tags(name, version, decision.tags())
    if champion_version is not None:
        registry.set_tags(name, champion_version, {
            "promotion.last_challenge": f"v{version}: {decision.tags()['promotion.decision']}",
            "promotion.last_challenge_score_same_frames": f"{champion_score:.6f}",
        })
    if decision.promote:
        registry.set_alias(name, registry.CHAMPION, version)
        registry.delete_alias(name, registry.CHALLENGER) if _alias_is(name, registry.CHALLENGER, version) else None
    else:
        registry.set_alias(name, registry.CHALLENGER, version)
    return decision


def _alias_is(name: str, alias: str, version: str) -> bool:
    current = registry.version_by_alias(name, alias)
    return current is not None and str(current.version) == version
