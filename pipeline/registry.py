"""MLflow: the tracking store, runs, the registered model (``registry.model_name``) and its aliases.

By default a SQLite store under ``mlflow/`` in the project; ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHAMPION = "champion"
CHALLENGER = "challenger"

# Tags carried by every run and registered version: the lineage of a model.
TAG_DATA_HASH = "data.dvc_hash"
TAG_DATA_REV = "data.git_revision"
TAG_DATA_FILE = "data.dvc_file"
TAG_CODE_REV = "code.git_commit"
TAG_CODE_DIRTY = "code.dirty"
TAG_CODE_DIGEST = "code.digest"
TAG_PARAMS_HASH = "params.hash"
TAG_FLOW_RUN = "prefect.flow_run_id"
TAG_VALIDATION = "validation.success"
TAG_SPLIT_DIGEST = "split.digest"    # the recorded subject split (data/split.yaml) the version trained with
TAG_ENV_DIGEST = "env.digest"        # lock file, torch, Python, device and precision (pipeline.environment_key)
TAG_PRODUCT_VERSION = "nerveseg.version"  # the release of this project that trained it (CHANGELOG.md)
PRESENCE_PREFIX = "presence."        # frames (and frames without a nerve) trained and scored on


def product_version() -> str:
    """The installed release of nerveseg (pyproject.toml's version), or ``unknown`` outside an install."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nerveseg")
    except PackageNotFoundError:
        return "unknown"


def default_tracking_uri(mlflow_dir: Path) -> str:
    return f"sqlite:///{Path(mlflow_dir).resolve() / 'mlflow.db'}"


def tracking_uri(mlflow_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else the project's running tracking server (``nerveseg services up``),
    else the embedded SQLite store."""
    from pipeline.service_state import mlflow_tracking_uri

    return (os.environ.get("MLFLOW_TRACKING_URI") or mlflow_tracking_uri(Path(mlflow_dir).resolve().parent)
            or default_tracking_uri(mlflow_dir))


def configure(mlflow_dir: Path, experiment: str) -> str:
    """Point MLflow at the project's store and return the experiment id (created if needed)."""
    import mlflow

    uri = tracking_uri(mlflow_dir)
    local = uri == default_tracking_uri(mlflow_dir)
    if local:
        Path(mlflow_dir).mkdir(parents=True, exist_ok=True)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; put back the operator's own value
    # so the variable keeps meaning "the user chose a store" (and the next project is not pinned).
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    # With the local default, keep artifacts beside the database rather than in ./mlruns. So does the
    # project's own tracking server on that same SQLite file (`services up`, sqlite profile): the runs
    # stay readable embedded after `services down` (a proxied mlflow-artifacts:/ location would not be).
    from pipeline.service_state import mlflow_shares_project_store

    shared = mlflow_shares_project_store(Path(mlflow_dir).resolve().parent, uri)
    location = (Path(mlflow_dir).resolve() / "artifacts").as_uri() if local or shared else None
    return client.create_experiment(experiment, artifact_location=location)


def client():
    import mlflow

    return mlflow.MlflowClient()


def signature():
    """Only the ``output`` parameter: an MLflow schema holds tensors or columns, never both, and every
    tensor is required, so no input schema admits both the frames tensor and the ``image`` column.
    The model checks its input itself (``pipeline.serving``; docs/decisions/0019-compact-serving-form.md)."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType, ParamSchema, ParamSpec

    from pipeline.serving import OUTPUT_PARAM

    return ModelSignature(params=ParamSchema([ParamSpec(OUTPUT_PARAM, DataType.string, "auto")]))


# What the signature cannot say, in the model's MLmodel file for whoever serves it.
SERVING_FORMS = {
    "inputs": {
        "tensor": "uint8 frames (N, H, W) or (H, W): {\"inputs\": [[[0, 12, ...]]]}",
        "image": "a column 'image' of PNG/TIFF/JPEG files, base64 in JSON: {\"inputs\": {\"image\": [\"<base64>\"]}} "
                 "or dataframe_split / dataframe_records with that column",
    },
    "output": "params.output: tensor ((N, H, W) uint8 in {0, 1}), png (base64 PNG, 0/255) or rle "
              "(competition run-length encoding); auto (default): tensor for frames, png for images",
}


def pip_requirements() -> list[str]:
    """Explicit requirements: MLflow would record the CPU torch as plain ``torch`` and a fresh
    serving environment would then pull a multi-GB CUDA build; pin what the model imports."""
    from importlib.metadata import version

    torch_version = version("torch").split("+")[0]
    return [f"{name}=={version(name)}" for name in ("mlflow", "numpy", "opencv-python-headless")] + [
        f"torch=={torch_version}"
    ]


def log_model(run_id: str, bundle_dir: Path, input_example: np.ndarray) -> str:
    """Log the bundle as a pyfunc model in ``run_id``; return its ``models:/`` URI."""
    import mlflow

    package_dir = Path(__file__).resolve().parent
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(package_dir / "mlflow_model.py"),
            artifacts={"bundle": str(bundle_dir)},
            code_paths=[str(package_dir)],
            signature=signature(),
            input_example=input_example,
            pip_requirements=pip_requirements(),
            metadata={"nerveseg.serving": SERVING_FORMS},
        )
    return info.model_uri


def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """A new version of ``name``; returns the version number as a string."""
    import mlflow

    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


def champion_uri(name: str) -> str:
    """``models:/NAME@champion``: what the commands load or describe when given no model."""
    return f"models:/{name}@{CHAMPION}"


def version_by_alias(name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_tags(name: str, version: str, tags: dict[str, object]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, str(value))


def set_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


def delete_alias(name: str, alias: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client().delete_registered_model_alias(name, alias)
    except MlflowException:
        pass


def load_model(uri: str):
    import mlflow

    return mlflow.pyfunc.load_model(uri)


@dataclass(frozen=True)
class VersionInfo:
    version: str
    aliases: list[str]
    run_id: str | None
    created: int
    tags: dict[str, str]
    metrics: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "aliases": self.aliases,
            "run_id": self.run_id,
            "created_timestamp_ms": self.created,
            "data_hash": self.tags.get(TAG_DATA_HASH),
            "data_git_revision": self.tags.get(TAG_DATA_REV),
            "code_git_commit": self.tags.get(TAG_CODE_REV),
            "params_hash": self.tags.get(TAG_PARAMS_HASH),
            "prefect_flow_run_id": self.tags.get(TAG_FLOW_RUN),
            "holdout_metrics": self.metrics,
            "promotion": {k.removeprefix("promotion."): v for k, v in self.tags.items() if k.startswith("promotion.")},
            # The subjects it trained, validated and was scored on (digest and counts; the lists are the
            # run's split/split.json artifact), and the environment it trained in.
            "split": {k.removeprefix("split."): v for k, v in self.tags.items() if k.startswith("split.")},
            "environment": {k.removeprefix("env."): v for k, v in self.tags.items() if k.startswith("env.")},
            "nerveseg_version": self.tags.get(TAG_PRODUCT_VERSION),
            "presence": {k.removeprefix(PRESENCE_PREFIX): v for k, v in self.tags.items()
                         if k.startswith(PRESENCE_PREFIX)},
        }


def list_versions(name: str) -> list[VersionInfo]:
    """Every registered version, newest first, with its aliases and holdout metrics."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        aliases = c.get_registered_model(name).aliases or {}
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    out = []
    for mv in c.search_model_versions(f"name='{name}'"):
        tags = dict(mv.tags or {})
        metrics = {
            k.removeprefix("holdout."): float(v) for k, v in tags.items() if k.startswith("holdout.")
        }
        out.append(VersionInfo(str(mv.version), sorted(by_version.get(str(mv.version), [])), mv.run_id,
                               int(mv.creation_timestamp or 0), tags, metrics))
    return sorted(out, key=lambda v: int(v.version), reverse=True)
