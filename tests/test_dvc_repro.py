"""``dvc repro`` runs the same stages on its own, without Prefect."""

import json

import pytest

from pipeline import versioning

pytestmark = pytest.mark.e2e


def test_dvc_repro_runs_every_stage_and_leaves_a_clean_status(tmp_path, project_copy):
    root = project_copy(tmp_path / "project")
    versioning.dvc(root, "repro", "-q")
    assert versioning.pipeline_status(root) == {}
    metrics = json.loads((root / "reports" / "holdout_metrics.json").read_text())
    assert 0 <= metrics["dice"] <= 1
    assert (root / "dvc.lock").is_file()
    # a parameter change makes exactly the affected stages stale
    params = (root / "params.yaml").read_text().replace("overlays: 4", "overlays: 2")
    (root / "params.yaml").write_text(params)
    stale = versioning.pipeline_status(root)
    assert set(stale) == {"evaluate"}
