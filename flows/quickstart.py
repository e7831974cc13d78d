"""The main job on the embedded default: generate the phantom, version it with DVC (local
remote, pushed), and run the retraining flow to a promoted model."""

from __future__ import annotations

from pathlib import Path

from pipeline import stages, versioning
from pipeline.config import load_params
from pipeline.layout import list_frame_pairs
from pipeline.paths import ProjectPaths
from pipeline.phantom import PhantomSpec, generate_phantom


def ensure_versioned_phantom(root: Path, params_file: str = "params.yaml", echo=print) -> versioning.DataVersion:
    root = Path(root).resolve()
    params = load_params(root / params_file)
    paths = ProjectPaths.of(root, params)
    versioning.ensure_dvc_repo(root, paths.dvc_remote)
    if paths.raw_dvc_file.is_file() and not paths.raw_dir.exists():
        echo(f"restoring {paths.rel(paths.raw_dir)} from the DVC cache/remote")
        versioning.dvc(root, "pull", "-q", paths.rel(paths.raw_dvc_file))
    if list_frame_pairs(paths.raw_dir).empty:
        synth = params.data.synth
        echo(f"generating the phantom: {synth.subjects} subjects x {synth.frames_per_subject} frames "
             f"(seed {synth.seed}) into {paths.rel(paths.raw_dir)}/train")
        table = generate_phantom(paths.raw_dir, PhantomSpec(synth.subjects, synth.frames_per_subject, synth.seed),
                                 progress=True)
        message = (f"data: synthetic phantom, {len(table)} frames of {table.subject.nunique()} subjects "
                   f"(seed {synth.seed})")
    else:
        message = f"data: version {paths.rel(paths.raw_dir)}"
    if paths.raw_dvc_file.is_file():
        try:
            version = versioning.current_data_version(root, paths.raw_dir)
            if version.committed:
                versioning.dvc(root, "push", "-q", paths.rel(paths.raw_dvc_file))
                return version
        except versioning.DataVersionError:
            pass
    echo(f"versioning {paths.rel(paths.raw_dir)} with DVC and pushing to the default remote")
    stages.recorded_split(paths, params, log=echo)  # committed with the version, as `data add` does
    return versioning.version_data(root, paths.raw_dir, message, also=(paths.rel(paths.split_file),))
