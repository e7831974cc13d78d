"""Splits of versions registered before splits were recorded, recovered from what their run logged,
on a real git + DVC project and a real MLflow store."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from pipeline import registry, versioning
from pipeline.comparison import comparison_set, recover_split
from pipeline.config import load_params
from pipeline.split import legacy_groups, part_of
from tests.conftest import seed_mlflow_store


def _legacy_run(root, params, holdout: list[int]):
    """An MLflow run as the flow logged it before splits were recorded: split.* parameters and the
    evaluation's per-frame table, no split artifact; and the version's data tags."""
    experiment = registry.configure(root / "mlflow", params.registry.experiment)
    client = registry.client()
    run_id = client.create_run(experiment).info.run_id
    for key, value in params.split.model_dump().items():
        client.log_param(run_id, f"split.{key}", str(value))
    frames = pd.DataFrame({"frame_id": [f"{s}_1" for s in holdout], "subject": holdout})
    client.log_text(run_id, frames.to_csv(index=False), "evaluation/holdout_frames.csv")
    version = versioning.current_data_version(root, root / "data" / "raw")
    tags = {registry.TAG_DATA_HASH: version.dvc_hash, registry.TAG_DATA_REV: version.git_revision,
            registry.TAG_DATA_FILE: version.dvc_file}
    return SimpleNamespace(run_id=run_id, tags=tags)


def test_an_earlier_split_is_recovered_from_the_run_and_its_data_version(tmp_path, project_copy, mlflow_store_template):
    root = project_copy(tmp_path / "project")
    seed_mlflow_store(root / "mlflow", mlflow_store_template)  # an empty store: MLflow's migrations done once
    params = load_params(root / "params.yaml")
    subjects = list(range(1, params.data.synth.subjects + 1))
    earlier = {s: part_of(g) for s, g in legacy_groups(subjects, params.split).items()}
    holdout = sorted(s for s, p in earlier.items() if p == "holdout")

    record = recover_split(_legacy_run(root, params, holdout), root)
    assert record.source == "recovered"
    assert record.train == sorted(s for s, p in earlier.items() if p == "train")
    assert record.validation == sorted(s for s, p in earlier.items() if p == "validation")
    assert record.holdout == holdout

    # A logged holdout that the earlier rule does not reproduce: only those subjects count as unseen.
    other = [s for s in subjects if s not in holdout][:2]
    distrusted = recover_split(_legacy_run(root, params, other), root)
    assert distrusted.source == "holdout-only" and distrusted.holdout == other
    table = pd.DataFrame({"subject": subjects, "frame_id": [f"{s}_1" for s in subjects]})
    comparison, frames = comparison_set(table, {"champion v1": distrusted})
    assert comparison.subjects == other and sorted(frames["subject"]) == other
    assert all(why.startswith("champion v1 had it outside its logged holdout") for why in comparison.excluded.values())
