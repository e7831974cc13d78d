"""Shared fixtures: tiny projects on real components (git, DVC, MLflow, Prefect).

A "tiny project" is a copy of this repository's pipeline definition (params.yaml with tiny
settings, dvc.yaml, the GX project, the code that dvc.yaml depends on) in a temporary git
repository with DVC initialised, a local DVC remote and a small phantom versioned in it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "datasets" / "kaggle-uns"

# Under `make test` the modules run in parallel worker processes (pytest-xdist) on a few cores: one torch
# thread each (inherited by the CLI and torchrun processes they start), so they share the cores rather
# than each claiming all of them. Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Before anything imports Prefect: a throw-away Prefect home, no telemetry, no outside server,
# and no tracking server inherited from the developer's shell.
_PREFECT_HOME = tempfile.mkdtemp(prefix="nerveseg-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
for _var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
    os.environ.pop(_var, None)
from flows.environment import configure_environment  # noqa: E402

configure_environment(REPO)
# Prefect's console log handler keeps the stream it was created with: create it now, on the real
# stderr, not inside a typer CliRunner call whose captured stream is closed when the call ends.
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()



# The longest modules, longest first (`pytest --durations`, summed per module under `make test`: the first
# three take 3-4 minutes each, the others 1-1.5 minutes; all have few tests). xdist's own order (most tests
# first, `--loadscope-reorder`) starts them last, and the run then waits for them alone; `make test` passes
# `--no-loadscope-reorder` and this order: them first, then the rest as xdist would order it, so the many
# short modules fill the gaps at the end.
LONGEST_MODULES = ("test_shared_deployment", "test_backup", "test_lifecycle", "test_services", "test_schedule",
                   "test_data_trigger", "test_faults", "test_second_machine", "test_distributed_flow")


def pytest_collection_modifyitems(session, config, items):
    sizes: dict[str, int] = {}
    for item in items:
        sizes[item.nodeid.split("::")[0]] = sizes.get(item.nodeid.split("::")[0], 0) + 1

    def order(item):
        module = item.nodeid.split("::")[0]
        stem = Path(module).stem
        return (LONGEST_MODULES.index(stem) if stem in LONGEST_MODULES else len(LONGEST_MODULES), -sizes[module])

    items.sort(key=order)  # stable: tests keep their order within a module


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


# Small enough to train in seconds on two CPU cores, big enough to learn something.
TINY_SETTINGS = {
    "data": {"synth": {"subjects": 6, "frames_per_subject": 6, "seed": 7}},
    "validation": {"min_frames": 6, "min_subjects": 3},
    "preprocess": {"height": 32, "width": 48},
    "split": {"seed": 1, "validation_fraction": 0.17, "holdout_fraction": 0.34},
    "model": {"depth": 3, "base_width": 8, "dropout": 0.0},
    "train": {"epochs": 3, "batch_size": 8, "learning_rate": 0.01, "early_stopping_patience": 3},
    "evaluate": {"overlays": 4},
    # Three epochs on 32x48 frames rarely find the nerve: the floor is off here and tested on its own
    # (tests/test_promotion.py, tests/test_release.py).
    # Its holdout has 2 subjects (6 in all): compare on what there is.
    "promotion": {"min_nerve_dice": 0.0, "min_gain_over_empty": -1.0, "min_comparison_subjects": 1},
}

PROJECT_FILES = ["dvc.yaml", ".gitignore", ".dvcignore"]
PROJECT_DIRS = ["pipeline", "gx"]


def deep_update(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def with_settings(params, changes: dict):
    """``params`` with ``changes`` (nested dicts, as in params.yaml) on top, validated again."""
    return type(params).model_validate(deep_update(params.model_dump(), changes))


def write_settings(root: Path, changes: dict) -> None:
    """Apply ``changes`` on top of the repository's params.yaml and write it to ``root``."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_update(base, changes), sort_keys=False))


def make_project(root: Path, settings: dict | None = None, with_data: bool = True) -> Path:
    from pipeline import versioning
    from pipeline.config import load_params
    from pipeline.paths import ProjectPaths
    from pipeline.phantom import PhantomSpec, generate_phantom

    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, root / name)
    for name in PROJECT_DIRS:
        if (REPO / name).exists():
            shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "uncommitted", "profiles"))
    write_settings(root, settings if settings is not None else TINY_SETTINGS)
    versioning.git(root, "init", "-q")
    versioning.git_commit(root, ["."], "project files")
    params = load_params(root / "params.yaml")
    paths = ProjectPaths.of(root, params)
    versioning.ensure_dvc_repo(root, paths.dvc_remote)
    if with_data:
        synth = params.data.synth
        generate_phantom(paths.raw_dir, PhantomSpec(synth.subjects, synth.frames_per_subject, synth.seed))
        from pipeline import stages

        stages.recorded_split(paths, params)  # committed with the version, as quickstart and `data add` do
        versioning.version_data(root, paths.raw_dir, "data: tiny phantom", also=(paths.rel(paths.split_file),))
    return root


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole session (each start costs ~20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real frames are only on development and CI machines)")
    return SHARED_DATA


def write_simple_dataset(data_dir: Path, subjects: int = 6, frames: int = 4, seed: int = 0) -> Path:
    """A fast hand-made dataset in the competition's layout (dark ellipse = nerve), for unit tests
    that need frames but not realism."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    train = Path(data_dir) / "train"
    train.mkdir(parents=True, exist_ok=True)
    for s in range(1, subjects + 1):
        for n in range(1, frames + 1):
            image = rng.rayleigh(60, (420, 580)).clip(0, 255).astype(np.uint8)
            mask = np.zeros((420, 580), np.uint8)
            if n % 2:
                cv2.ellipse(mask, (250 + 8 * n, 210), (55, 40), 0, 0, 360, 255, -1)
                image[mask > 0] //= 3
            cv2.imwrite(str(train / f"{s}_{n}.tif"), image)
            cv2.imwrite(str(train / f"{s}_{n}_mask.tif"), mask)
    return Path(data_dir)


def subject_batch(source: Path, out: Path, subjects) -> Path:
    """A folder in the competition's layout holding the frames of ``subjects`` only (an import batch)."""
    train = out / "train"
    train.mkdir(parents=True)
    for subject in subjects:
        for path in (source / "train").glob(f"{subject}_*.tif"):
            shutil.copy2(path, train / path.name)
    return out


def tiny_model_config(norm: str = "batch"):
    """A two-level width-8 network's config at a 32x44 working size: enough to tell layouts and
    normalisations apart in a fraction of a second."""
    from pipeline.model import ModelConfig

    return ModelConfig(depth=2, base_width=8, dropout=0.0, height=32, width=44, intensity_mean=0.3,
                       intensity_std=0.2, norm=norm)


@pytest.fixture
def tiny_params():
    from pipeline.config import Params

    return with_settings(Params(), TINY_SETTINGS)


@pytest.fixture
def prepared(tmp_path, tiny_params):
    """A simple dataset, preprocessed: returns ProjectPaths of a folder (no git/DVC)."""
    from pipeline import stages
    from pipeline.paths import ProjectPaths

    paths = ProjectPaths.of(tmp_path, tiny_params)
    write_simple_dataset(paths.raw_dir)
    stages.prepare(paths, tiny_params, progress=False)
    return paths


def prepare_again(paths, params) -> None:
    """Prepare with other split settings: a fresh recorded split of these subjects (what
    `nerveseg data resplit` would record), then the preprocess stage."""
    from pipeline import stages

    paths.split_file.unlink(missing_ok=True)
    stages.prepare(paths, params, progress=False)


# --- Set-ups built once per session (once per xdist worker) and copied into each test ---


def run_cli(root: Path, *args: str, check: bool = True):
    """``nerveseg ARGS`` as an operator runs it in ``root`` (the folder is the current one, the project's own
    Prefect home, no tracking server or Prefect API inherited from the test process: what
    ``tests.service_helpers.nerveseg`` gives a separate process), but in this process, through typer's
    CliRunner: the same commands, without the seconds of imports of a new interpreter. Returns
    ``returncode``, ``stdout`` and ``stderr`` like ``subprocess.run``."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from flows.cli import app

    env = {name: None for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["PREFECT_HOME"] = str(Path(root) / ".prefect")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, list(args), env=env)
    finally:
        os.chdir(cwd)
    done = SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr,
                           exception=result.exception)
    if check and result.exit_code != 0:
        import traceback

        trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        raise AssertionError(f"nerveseg {' '.join(args)} exited {result.exit_code}\nstdout:\n{result.stdout[-4000:]}\n"
                             f"stderr:\n{result.stderr[-6000:]}\n{trace[-6000:]}")
    return done


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store made by this MLflow (its schema migrations take seconds per store),
    once per session: ``seed_mlflow_store`` puts a copy where a test's store goes. What the copy holds is
    what MLflow writes into a new store (the schema at head and its Default experiment), so the code under
    test finds an existing, empty store instead of creating one; its own experiment and everything after
    are written by the code under test."""
    import mlflow

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def seed_mlflow_store(mlflow_dir: Path, template: Path) -> Path:
    """A copy of ``template`` (``mlflow_store_template``) as ``mlflow_dir``/mlflow.db, the project's default
    embedded store; refuses to replace a store that is there."""
    import sqlite3

    mlflow_dir = Path(mlflow_dir)
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    target = mlflow_dir / "mlflow.db"
    assert not target.exists(), f"{target} exists already"
    source, copy = sqlite3.connect(template), sqlite3.connect(target)
    try:
        source.backup(copy)  # consistent even if MLflow's own connection to the template is still open
    finally:
        source.close()
        copy.close()
    return target


@pytest.fixture(scope="session")
def project_copy(tmp_path_factory):
    """``make_project(dest, settings, with_data)`` at the cost of a folder copy: each distinct
    (settings, with_data) is built once per session by ``make_project`` and copied (git history, DVC cache,
    its local remote and ``.dvc/config`` hold no absolute path; DVC's hash cache is keyed by the folder's
    path, so a copy starts with none)."""
    import json

    built: dict[tuple[str, bool], Path] = {}

    def copy(dest: Path, settings: dict | None = None, with_data: bool = True) -> Path:
        key = (json.dumps(TINY_SETTINGS if settings is None else settings, sort_keys=True), with_data)
        if key not in built:
            built[key] = make_project(tmp_path_factory.mktemp("project-template") / "project", settings, with_data)
        shutil.copytree(built[key], dest, symlinks=True)
        return Path(dest)

    return copy
