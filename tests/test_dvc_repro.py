"""``dvc repro`` runs the same stages on its own, without Prefect."""

import hashlib
import json

import pytest
import yaml

from pipeline import versioning

pytestmark = pytest.mark.e2e


def test_dvc_repro_runs_every_stage_and_leaves_a_clean_status(tmp_path, project_copy):
    root = project_copy(tmp_path / "project")
    versioning.dvc(root, "repro", "-q")
    assert versioning.pipeline_status(root) == {}
    metrics = json.loads((root / "reports" / "holdout_metrics.json").read_text())
    assert 0 <= metrics["dice"] <= 1
    # dvc.lock records what each stage produced: the metrics file by the md5 of its bytes
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"validate", "preprocess", "train", "evaluate"}
    outs = {o["path"]: o for o in lock["evaluate"]["outs"]}
    recorded = outs["reports/holdout_metrics.json"]["md5"]
    assert recorded == hashlib.md5((root / "reports" / "holdout_metrics.json").read_bytes()).hexdigest()
    # a parameter change makes exactly the affected stages stale
    params = (root / "params.yaml").read_text().replace("overlays: 4", "overlays: 2")
    (root / "params.yaml").write_text(params)
    stale = versioning.pipeline_status(root)
    assert set(stale) == {"evaluate"}
