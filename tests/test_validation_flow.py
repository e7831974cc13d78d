"""A corpus of defects, each planted in one real project (git + DVC + MLflow + Prefect), versioned
and run through the retraining flow: every one is caught with the offending file named, and the
flow stops before preprocessing with nothing trained, registered or aliased. Also drift between
two data versions, judged from the previous version's stored profile."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import TINY_SETTINGS, deep_update, make_project, seed_mlflow_store

pytestmark = pytest.mark.e2e

MODEL = "nerve-segmentation"
H, W = 420, 580


def _img(train: Path, name: str) -> np.ndarray:
    return cv2.imread(str(train / name), cv2.IMREAD_UNCHANGED)


def _put(train: Path, name: str, array: np.ndarray) -> None:
    assert cv2.imwrite(str(train / name), array)


def _with_nerve(train: Path) -> str:
    """The first frame id whose mask is not empty."""
    for mask in sorted(train.glob("*_mask.tif")):
        if cv2.countNonZero(_img(train, mask.name)):
            return mask.name.removesuffix("_mask.tif")
    raise AssertionError("no frame with a nerve")


def _missing_mask(t: Path) -> str:
    (t / "2_3_mask.tif").unlink()
    return "train/2_3.tif"


def _mask_without_frame(t: Path) -> str:
    (t / "2_4.tif").unlink()
    return "train/2_4_mask.tif"


def _garbage_frame(t: Path) -> str:
    (t / "3_1.tif").write_bytes(b"not a TIFF\x00" * 100)
    return "train/3_1.tif"


def _empty_mask_file(t: Path) -> str:
    (t / "3_2_mask.tif").write_bytes(b"")
    return "train/3_2_mask.tif"


def _wrong_size(t: Path) -> str:
    _put(t, "4_1.tif", cv2.resize(_img(t, "4_1.tif"), (W, 400)))
    return "train/4_1.tif"


def _rgb_frame(t: Path) -> str:
    _put(t, "4_2.tif", cv2.cvtColor(_img(t, "4_2.tif"), cv2.COLOR_GRAY2BGR))
    return "train/4_2.tif"


def _sixteen_bit_frame(t: Path) -> str:
    _put(t, "4_3.tif", _img(t, "4_3.tif").astype(np.uint16) * 200)
    return "train/4_3.tif"


def _mask_wrong_size(t: Path) -> str:
    _put(t, "5_1_mask.tif", np.zeros((H, 600), np.uint8))
    return "train/5_1_mask.tif"


def _non_binary_mask(t: Path) -> str:
    mask = _img(t, "5_2_mask.tif")
    mask[10:20, 10:20] = 77
    _put(t, "5_2_mask.tif", mask)
    return "train/5_2_mask.tif"


def _blank_frame(t: Path) -> str:
    _put(t, "5_3.tif", np.full((H, W), 90, np.uint8))
    return "train/5_3.tif"


def _saturated_frame(t: Path) -> str:
    frame = np.full((H, W), 255, np.uint8)
    frame[:8] = 0
    _put(t, "6_1.tif", frame)
    return "train/6_1.tif"


def _tiny_mask(t: Path) -> str:
    mask = np.zeros((H, W), np.uint8)
    mask[200:210, 300:310] = 255
    _put(t, "6_2_mask.tif", mask)
    return "train/6_2_mask.tif"


def _huge_mask(t: Path) -> str:
    mask = np.zeros((H, W), np.uint8)
    mask[50:400, 50:500] = 255
    _put(t, "6_3_mask.tif", mask)
    return "train/6_3_mask.tif"


def _bad_name(t: Path) -> str:
    shutil.copy(t / "1_1.tif", t / "1_1 (copy).tif")
    return "train/1_1 (copy).tif"


def _contradicting_duplicate(t: Path) -> str:
    frame_id = _with_nerve(t)
    subject = frame_id.split("_")[0]
    shutil.copy(t / f"{frame_id}.tif", t / f"{subject}_99.tif")  # the same frame, again ...
    _put(t, f"{subject}_99_mask.tif", np.zeros((H, W), np.uint8))  # ... without its nerve
    return f"train/{subject}_99.tif"


# (defect, the check that must name its file), each in files of its own so that none hides another: one
# data version holding all of them goes through the flow once, and every one must be named (planted in
# this order: the duplicate copies a frame before any other defect touches the files).
# tests/test_validation.py plants each kind alone and checks that exactly its expectation fails.
DEFECTS = [
    (_contradicting_duplicate, "contradicting_duplicates"), (_missing_mask, "mask_for_frame"),
    (_garbage_frame, "frame_decodes"), (_wrong_size, "frame_height"), (_mask_wrong_size, "mask_width"),
    (_mask_without_frame, "frame_for_mask"), (_empty_mask_file, "mask_decodes"), (_rgb_frame, "frame_channels"),
    (_non_binary_mask, "mask_binary"), (_blank_frame, "not_blank"),
    (_bad_name, "names"), (_sixteen_bit_frame, "frame_dtype"), (_saturated_frame, "not_saturated"),
    (_tiny_mask, "mask_area"), (_huge_mask, "mask_area"),
]


def test_defect_corpus_stops_the_flow_before_training(tmp_path, prefect_server, mlflow_store_template):
    import mlflow
    from flows.retrain import retrain
    from pipeline import registry, versioning
    from pipeline.validation import DataValidationError

    # Near-duplicates with contradicting masks block in this project (a warning by default).
    settings = deep_update(TINY_SETTINGS, {"validation": {"warning_checks": ["drift"]}})
    root = make_project(tmp_path / "project", settings)
    seed_mlflow_store(root / "mlflow", mlflow_store_template)  # an empty store: MLflow's migrations done once
    raw, train = root / "data" / "raw", root / "data" / "raw" / "train"
    planted = [(defect, check, defect(train)) for defect, check in DEFECTS]
    assert len({expected for _, _, expected in planted}) == len(DEFECTS)  # each in a file of its own
    versioning.version_data(root, raw, "data: " + ", ".join(d.__name__ for d, _ in DEFECTS), push=False)
    with pytest.raises(DataValidationError) as info:
        retrain(project_dir=str(root))
    report = info.value.report
    assert not report.success
    by_check: dict[str, set[str]] = {}
    for failure in report.blocking:
        by_check.setdefault(failure.check, set()).update(failure.files)
    caught: dict[str, str] = {}
    for defect, check, expected in planted:
        assert expected in by_check.get(check, set()), (defect.__name__, report.format_failures())
        assert expected in str(info.value)  # what the CLI and the flow's error print
        caught[defect.__name__] = check
    # Stopped before preprocessing: nothing prepared, trained or registered.
    assert not (root / "data" / "prepared").exists()
    assert not (root / "models" / "model.pt").exists()

    assert len(caught) == len(DEFECTS) >= 12
    assert len(set(caught.values())) == 14

    registry.configure(root / "mlflow", MODEL)
    assert registry.list_versions(MODEL) == []
    assert registry.version_by_alias(MODEL, registry.CHAMPION) is None
    assert registry.version_by_alias(MODEL, registry.CHALLENGER) is None
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    assert {r.info.status for r in runs} == {"FAILED"}
    assert {r.data.tags.get(registry.TAG_VALIDATION) for r in runs} == {"false"}


def test_drift_against_the_previous_data_version(tmp_path, project_copy):
    from pipeline import stages, versioning
    from pipeline.config import load_params
    from pipeline.paths import ProjectPaths
    from pipeline.validation import load_profile, measure_profile

    root = project_copy(tmp_path / "project")
    params = load_params(root / "params.yaml")
    paths = ProjectPaths.of(root, params)
    first_hash = versioning.read_dvc_file(paths.raw_dvc_file)["md5"]
    _, first = stages.validate(paths, params, build_docs=False)
    assert first.drift is None and first.drift_note == ""  # no earlier version
    assert load_profile(paths.gx_dir, first_hash) == {"dvc_hash": first_hash, **first.profile}
    # what `data add` measures for a version made without a profile is what validation records
    assert measure_profile(paths.raw_dir, paths.gx_dir, first_hash) == load_profile(paths.gx_dir, first_hash)

    # A new version: every frame 40 grey levels darker, and half the nerves gone.
    train = paths.raw_dir / "train"
    for frame in sorted(train.glob("*.tif")):
        if frame.name.endswith("_mask.tif"):
            continue
        image = cv2.imread(str(frame), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(frame), (image.astype(np.int16) - 40).clip(5, 255).astype(np.uint8))
    versioning.version_data(root, paths.raw_dir, "data: darker scans", push=False)
    _, second = stages.validate(paths, params, build_docs=False)

    assert second.success  # drift warns, it does not block
    assert second.drift["previous_hash"] == first_hash and second.drift["drifted"]
    figures = second.drift["figures"]
    assert figures["intensity_mean"]["drifted"] and not figures["empty_share"]["drifted"]
    assert figures["intensity_mean"]["current"] < figures["intensity_mean"]["previous"] - 30
    (warning,) = [w for w in second.warnings if w.check == "drift"]
    assert "intensity_mean" in warning.column
    assert "intensity_mean" in second.to_markdown()


def test_drift_not_judged_is_said_not_silent(tmp_path, project_copy):
    """The previous data version has no profile (made before profiles, or validated elsewhere): the
    report says drift was not checked and why, instead of reading like "no drift"."""
    from pipeline import stages, versioning
    from pipeline.config import load_params
    from pipeline.paths import ProjectPaths

    root = project_copy(tmp_path / "project")
    params = load_params(root / "params.yaml")
    paths = ProjectPaths.of(root, params)
    first_hash = versioning.read_dvc_file(paths.raw_dvc_file)["md5"]
    (paths.raw_dir / "train" / "1_1.tif").unlink()
    (paths.raw_dir / "train" / "1_1_mask.tif").unlink()
    versioning.version_data(root, paths.raw_dir, "data: one frame fewer", push=False)

    _, report = stages.validate(paths, params, build_docs=False)
    assert report.success and report.drift is None
    assert first_hash[:12] in report.drift_note and "gx/profiles/" in report.drift_note
    assert f"drift not checked: no profile of the previous data version {first_hash[:12]}" in report.to_markdown()
    assert "drift not checked" in report.format_failures()  # what `nerveseg validate` and `data add` print
