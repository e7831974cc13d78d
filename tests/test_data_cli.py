"""``nerveseg data add / versions / checkout`` on a real git + DVC project and MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline import versioning
from tests.conftest import seed_mlflow_store, write_simple_dataset

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _head(root: Path) -> str:
    return versioning.git(root, "rev-parse", "HEAD").stdout.strip()


def _raw_files(root: Path) -> list[str]:
    raw = root / "data" / "raw"
    return sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()) if raw.exists() else []


def _register_model(root: Path, data_hash: str, store_template: Path) -> str:
    """A registered version that says it was trained on ``data_hash`` (no training needed), in the project's
    store (a copy of the session's empty store when there is none yet)."""
    import mlflow
    from pipeline import registry
    from pipeline.config import load_params
    from pipeline.paths import ProjectPaths

    params = load_params(root / "params.yaml")
    paths = ProjectPaths.of(root, params)
    if not (paths.mlflow_dir / "mlflow.db").exists():
        seed_mlflow_store(paths.mlflow_dir, store_template)
    experiment = registry.configure(paths.mlflow_dir, params.registry.experiment)

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
    return registry.register(info.model_uri, params.registry.model_name,
                             {registry.TAG_DATA_HASH: data_hash})


@pytest.fixture
def project(tmp_path, project_copy) -> Path:
    return project_copy(tmp_path / "project", with_data=False)


def test_add_twice_lists_two_versions_with_the_model_of_the_first(project, tmp_path, mlflow_store_template):
    first = write_simple_dataset(tmp_path / "first", subjects=4, frames=4)
    result = _invoke("data", "add", str(first / "train"), "-C", str(project))
    assert result.exit_code == 0, result.output
    assert "+16 frames, -0 removed, subjects 1-4 (4 new); now 16 frames of 4 subjects, 50.0% empty" in result.output
    first_hash = versioning.read_dvc_file(project / "data" / "raw.dvc")["md5"]
    assert (project / "dvc-remote").is_dir() and any((project / "dvc-remote").rglob("*.dir"))  # pushed
    assert "train/1_1.tif" in _raw_files(project) and "manifests/train.csv" in _raw_files(project)
    model_version = _register_model(project, first_hash, mlflow_store_template)

    # new frames of new subjects, in the competition's layout (masks from train_masks.csv)
    second = tmp_path / "second"
    (second / "train").mkdir(parents=True)
    rows = ["subject,img,pixels"]
    from pipeline.rle import rle_encode
    rng = np.random.default_rng(3)
    for s in (5, 6):
        for n in (1, 2):
            image = rng.rayleigh(60, (420, 580)).clip(0, 255).astype(np.uint8)
            mask = np.zeros((420, 580), np.uint8)
            if n == 1:
                cv2.ellipse(mask, (300, 200), (50, 40), 0, 0, 360, 1, -1)
            cv2.imwrite(str(second / "train" / f"{s}_{n}.tif"), image)
            rows.append(f"{s},{n},{rle_encode(mask)}")
    (second / "train_masks.csv").write_text("\n".join(rows) + "\n")
    result = _invoke("data", "add", str(second), "-C", str(project))
    assert result.exit_code == 0, result.output
    log = versioning.git(project, "log", "-n", "1", "--format=%s").stdout
    assert "+4 frames" in log and "subjects 5-6 (2 new)" in log and "now 20 frames of 6 subjects" in log

    result = _invoke("data", "versions", "--json", "-C", str(project))
    assert result.exit_code == 0, result.output
    versions = json.loads(result.stdout[result.stdout.index("{"):])["versions"]
    assert len(versions) == 2
    newest, oldest = versions
    assert oldest["dvc_hash"] == first_hash and oldest["models"][0]["version"] == model_version
    assert (oldest["frames"], oldest["subjects"], oldest["empty_share"]) == (16, 4, 0.5)
    assert (newest["frames"], newest["subjects"], newest["empty_share"]) == (20, 6, 0.5)
    assert newest["models"] == [] and newest["current"] and not oldest["current"]
    assert newest["git_revision"] == _head(project) and newest["date"]

    table = _invoke("data", "versions", "-C", str(project))
    assert first_hash[:12] in table.output and f"v{model_version}" in table.output

    # the same source again: nothing new, no new commit
    head = _head(project)
    result = _invoke("data", "add", str(second), "-C", str(project))
    assert result.exit_code == 0 and "nothing new" in result.output and _head(project) == head

    # back to the first version, and refused while data/raw has unversioned changes
    result = _invoke("data", "checkout", oldest["git_revision"], "-C", str(project))
    assert result.exit_code == 0, result.output
    assert not any(f.startswith("train/5_") for f in _raw_files(project))
    assert len([f for f in _raw_files(project) if f.startswith("train/")]) == 32
    result = _invoke("data", "checkout", "HEAD", "-C", str(project))
    assert result.exit_code == 0, result.output
    assert "train/6_2_mask.tif" in _raw_files(project)
    (project / "data" / "raw" / "train" / "1_1.tif").unlink()
    result = _invoke("data", "checkout", oldest["git_revision"], "-C", str(project))
    assert result.exit_code == 1 and "refusing to check out" in result.output
    result = _invoke("data", "add", str(first / "train"), "-C", str(project))
    assert result.exit_code == 1 and "refusing to add data" in result.output


def test_bad_input_and_failed_validation_leave_the_version_alone(project, tmp_path):
    first = write_simple_dataset(tmp_path / "first", subjects=4, frames=2)
    assert _invoke("data", "add", str(first / "train"), "-C", str(project)).exit_code == 0
    head, files = _head(project), _raw_files(project)
    dvc_text = (project / "data" / "raw.dvc").read_text()

    bad = tmp_path / "bad"
    bad.mkdir()
    cv2.imwrite(str(bad / "9_1.png"), np.full((420, 580), 90, np.uint8))
    cv2.imwrite(str(bad / "9_1_mask.png"), np.zeros((420, 580), np.uint8))
    (bad / "9_2.png").write_bytes(b"not an image at all")
    (bad / "9_2_mask.png").write_bytes(b"nor this")
    result = _invoke("data", "add", str(bad), "-C", str(project))
    assert result.exit_code == 1 and "9_2.png: not a readable image" in result.output
    assert "data/raw is unchanged" in result.output

    # decodes fine but breaks the validation rules (a 20-pixel nerve): refused, put back
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    rng = np.random.default_rng(0)
    mask = np.zeros((420, 580), np.uint8)
    mask[200:204, 300:305] = 255
    cv2.imwrite(str(tiny / "8_1.png"), rng.rayleigh(60, (420, 580)).clip(0, 255).astype(np.uint8))
    cv2.imwrite(str(tiny / "8_1_mask.png"), mask)
    result = _invoke("data", "add", str(tiny), "-C", str(project))
    assert result.exit_code == 1 and "validation failed" in result.output and "8_1_mask.tif" in result.output

    assert _head(project) == head and _raw_files(project) == files
    assert (project / "data" / "raw.dvc").read_text() == dvc_text
    assert json.loads(versioning.dvc(project, "status", "--json", "data/raw.dvc").stdout or "{}") == {}
    assert sorted(p.name for p in (project / "data").iterdir()) == [".gitignore", "raw", "raw.dvc", "split.yaml"]


def test_versions_made_without_figures_count_from_the_dvc_cache(tmp_path, project_copy):
    from pipeline.data_versions import list_data_versions

    root = project_copy(tmp_path / "plain", with_data=False)
    write_simple_dataset(root / "data" / "raw", subjects=3, frames=2)
    versioning.version_data(root, root / "data" / "raw", "data: plain dvc add", push=False)  # as quickstart
    (row,) = list_data_versions(root, root / "data" / "raw")
    assert row.figures_from == "cache" and row.current
    assert (row.frames, row.subjects, row.empty_share) == (6, 3, None)


def _darker_copy(src: Path, dst: Path, by: int) -> Path:
    """``src``'s frames ``by`` grey levels darker (masks as they are), in the same layout."""
    for path in sorted(src.rglob("*.tif")):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if not path.name.endswith("_mask.tif"):
            image = (image.astype(np.int16) - by).clip(5, 255).astype(np.uint8)
        cv2.imwrite(str(out), image)
    return dst


def _committed_profiles(root: Path) -> list[str]:
    shown = versioning.git(root, "show", "--name-only", "--format=", "HEAD").stdout.split()
    return sorted(p for p in shown if p.startswith("gx/profiles/"))


def test_add_judges_drift_against_the_version_it_replaces_and_commits_the_profiles(project, tmp_path):
    from pipeline.validation import load_profile

    first = write_simple_dataset(tmp_path / "first", subjects=4, frames=2)
    result = _invoke("data", "add", str(first / "train"), "-C", str(project))
    assert result.exit_code == 0, result.output
    first_hash = versioning.read_dvc_file(project / "data" / "raw.dvc")["md5"]
    # the profile is part of the version's commit, not a file left for the operator to add
    assert _committed_profiles(project) == [f"gx/profiles/{first_hash.removesuffix('.dir')}.json"]
    assert "drift against" not in result.output and "drift not checked" not in result.output  # the first

    # more frames like these: the figures against the first version, none beyond its limit
    more = write_simple_dataset(tmp_path / "more", subjects=5, frames=2, seed=1)
    result = _invoke("data", "add", str(more / "train"), "-C", str(project))
    assert result.exit_code == 0, result.output
    second_hash = versioning.read_dvc_file(project / "data" / "raw.dvc")["md5"]
    assert f"drift against data version {first_hash[:12]}: intensity_mean" in result.output
    assert "(!)" not in result.output

    # the same frames, 40 grey levels darker, replacing them: a warning, still a new version
    darker = _darker_copy(project / "data" / "raw" / "train", tmp_path / "darker" / "train", by=40)
    result = _invoke("data", "add", str(darker), "--replace", "-C", str(project))
    assert result.exit_code == 0, result.output
    third_hash = versioning.read_dvc_file(project / "data" / "raw.dvc")["md5"]
    assert third_hash != second_hash
    assert "data validation passed with" in result.output
    assert f"[warning] figures close to the previous data version {second_hash[:12]}: intensity_mean" in result.output
    assert "(!)" in result.output
    assert _committed_profiles(project) == [f"gx/profiles/{third_hash.removesuffix('.dir')}.json"]
    assert not versioning.git(project, "status", "--porcelain", "--", "gx/profiles").stdout.strip()
    profile = load_profile(project, third_hash)
    assert profile["intensity_mean"] < load_profile(project, second_hash)["intensity_mean"] - 30


def test_add_measures_the_profile_of_a_version_made_without_one(tmp_path, project_copy):
    """A version from `quickstart` or a plain `dvc add` has no profile: `data add` measures the data it
    replaces, judges drift against it and commits both profiles, so the flow finds them too."""
    from pipeline import stages
    from pipeline.config import load_params
    from pipeline.paths import ProjectPaths
    from pipeline.validation import load_profile

    root = project_copy(tmp_path / "plain", with_data=False)
    write_simple_dataset(root / "data" / "raw", subjects=3, frames=2)
    first = versioning.version_data(root, root / "data" / "raw", "data: plain dvc add", push=False)
    assert load_profile(root, first.dvc_hash) is None

    darker = _darker_copy(root / "data" / "raw" / "train", tmp_path / "darker" / "train", by=40)
    result = _invoke("data", "add", str(darker), "--replace", "-C", str(root))
    assert result.exit_code == 0, result.output
    assert f"figures close to the previous data version {first.dvc_hash[:12]}" in result.output
    assert "(!)" in result.output
    second_hash = versioning.read_dvc_file(root / "data" / "raw.dvc")["md5"]
    assert _committed_profiles(root) == sorted(f"gx/profiles/{h.removesuffix('.dir')}.json"
                                               for h in (first.dvc_hash, second_hash))

    # the flow's validation stage now judges the same drift from the committed profiles
    params = load_params(root / "params.yaml")
    _, report = stages.validate(ProjectPaths.of(root, params), params, build_docs=False)
    assert report.drift["previous_hash"] == first.dvc_hash and report.drift["drifted"]
    assert report.drift_note == ""


def test_audit_and_card_say_when_false_alarms_were_not_measured(project, mlflow_store_template):
    """A version whose holdout had no frame without a nerve (real data from positives-256): `audit` and
    the model card warn that presence accuracy only counts nerve frames found."""
    from pipeline import registry
    from pipeline.audit import lineage, to_text
    from pipeline.model_card import build_card

    version = _register_model(project, "0123abcd.dir", mlflow_store_template)
    registry.set_tags("nerve-segmentation", version, {"holdout.dice": "0.79", "holdout.empty_baseline_dice": "0.0"})
    record = lineage(f"models:/nerve-segmentation/{version}", "nerve-segmentation")
    assert any(w.startswith("no holdout frame is without a nerve") for w in record["warnings"])
    assert "WARNING: no holdout frame is without a nerve" in to_text(record)
    assert "no holdout frame is without a nerve" in build_card(f"models:/nerve-segmentation/{version}",
                                                               "nerve-segmentation")

    other = _register_model(project, "0123abcd.dir", mlflow_store_template)
    registry.set_tags("nerve-segmentation", other, {"holdout.empty_baseline_dice": "0.6889"})
    assert lineage(f"models:/nerve-segmentation/{other}", "nerve-segmentation")["warnings"] == []
