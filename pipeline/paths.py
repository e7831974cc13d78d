"""Where each piece of project state lives, relative to the project root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Params


@dataclass(frozen=True)
class ProjectPaths:
    root: Path
    raw_dir: Path            # DVC-tracked scans and masks (data/raw, versioned by data/raw.dvc)
    prepared_dir: Path       # preprocess stage output
    models_dir: Path         # train stage output
    reports_dir: Path        # validate and evaluate stage outputs
    gx_dir: Path             # root of the Great Expectations file project (<gx_dir>/gx, kept in git)
    mlflow_dir: Path         # the local MLflow store (SQLite + artifacts) by default
    prefect_home: Path       # Prefect's local home (ephemeral server database, settings)
    dvc_remote: Path         # the default local DVC remote

    @classmethod
    def of(cls, root: Path | str, params: Params) -> "ProjectPaths":
        root = Path(root).resolve()
        return cls(
            root=root,
            raw_dir=root / params.data.raw_dir,
            prepared_dir=root / params.preprocess.out_dir,
            models_dir=root / params.train.out_dir,
            reports_dir=root / params.evaluate.out_dir,
            gx_dir=root,  # GX keeps its file project in <root>/gx
            mlflow_dir=root / "mlflow",
            prefect_home=root / ".prefect",
            dvc_remote=root / "dvc-remote",
        )

    @property
    def raw_dvc_file(self) -> Path:
        return self.raw_dir.with_name(self.raw_dir.name + ".dvc")

    @property
    def split_file(self) -> Path:
        """The recorded subject split of ``raw_dir`` (``data/split.yaml``, kept in git beside the .dvc file)."""
        from pipeline.split import split_file

        return split_file(self.raw_dir)

    def rel(self, path: Path) -> str:
        """A path as the project (and DVC) names it."""
        return Path(path).resolve().relative_to(self.root).as_posix()
