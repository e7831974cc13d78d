"""A worker's own workspace, brought to the revision and data version a run names.

A worker on another machine (a GPU box, say) keeps a clone of the project: its *worker workspace*. Before
each run it gets there, :func:`sync` makes that clone what the server's workspace was when the run was made:

1. ``git fetch`` from the clone's ``origin`` (the server workspace, or the repository it pushes to);
2. ``git checkout --force --detach REVISION``: code, settings, ``data/raw.dvc`` and ``data/split.yaml`` of
   that commit. The workspace belongs to the worker: what a run changed there (``dvc.lock``, a subject
   recorded in the split) is put back, and the files are named in the log;
3. ``dvc pull`` of the data folder's ``.dvc`` file, from the clone's default DVC remote (the shared one).

Nothing is ever pushed from here: a worker's results go to the tracking server and the model registry.
Run as ``python -m pipeline.worker_workspace WORKSPACE REVISION`` (the flow's pull step does), so that the
code it checks out is imported fresh by the run, never half old and half new in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import versioning
from pipeline.config import load_params
from pipeline.paths import ProjectPaths


class WorkspaceError(RuntimeError):
    """The worker's workspace cannot be brought to the run's revision; the message says why and what to do."""


@dataclass(frozen=True)
class Synced:
    workspace: str
    revision: str         # the commit checked out
    data_hash: str        # DVC hash of the data folder at that commit
    dvc_file: str
    reset: tuple[str, ...]  # tracked files a previous run had changed, put back

    def line(self) -> str:
        reset = f"; put back {', '.join(self.reset)}" if self.reset else ""
        return (f"worker workspace {self.workspace} at {self.revision[:12]}, data {self.dvc_file} "
                f"{self.data_hash}{reset}")


def _git(workspace: Path, *args: str, check: bool = True):
    try:
        return versioning.git(workspace, *args, check=check)
    except versioning.CommandError as exc:
        raise WorkspaceError(str(exc)) from exc


def _resolve(workspace: Path, revision: str) -> str:
    found = _git(workspace, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=False)
    if found.returncode == 0:
        return found.stdout.strip()
    # A bare commit that no branch of origin names yet: ask for it by name (servers allow fetching a
    # reachable commit), then look again.
    _git(workspace, "fetch", "--quiet", "origin", revision, check=False)
    found = _git(workspace, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=False)
    if found.returncode == 0:
        return found.stdout.strip()
    origin = _git(workspace, "remote", "get-url", "origin", check=False).stdout.strip() or "(no origin)"
    raise WorkspaceError(
        f"{workspace}: revision {revision} is not in {origin}, the repository this worker fetches from. The run "
        "was made from a commit that has not reached it: push that commit there from the server workspace "
        "(`git push`), or make the server workspace itself this clone's origin (`git remote set-url origin ...`)"
    )


def sync(workspace: Path, revision: str, params_file: str = "params.yaml") -> Synced:
    """Bring ``workspace`` (a git clone of the project) to ``revision`` and pull that commit's data version."""
    workspace = Path(workspace).resolve()
    if _git(workspace, "rev-parse", "--show-toplevel", check=False).returncode != 0:
        raise WorkspaceError(f"{workspace}: not a git clone of the project; a worker workspace is made with "
                             "`git clone <server workspace or its repository> DIR` (docs/operations.md)")
    if not (workspace / ".dvc").is_dir():
        raise WorkspaceError(f"{workspace}: no .dvc folder; is this a clone of the project?")
    _git(workspace, "fetch", "--quiet", "origin")
    sha = _resolve(workspace, revision)
    changed = _git(workspace, "status", "--porcelain", "--untracked-files=no").stdout.splitlines()
    reset = tuple(sorted(line[3:] for line in changed if line.strip()))
    _git(workspace, "checkout", "--quiet", "--force", "--detach", sha)

    paths = ProjectPaths.of(workspace, load_params(workspace / params_file))
    dvc_file = paths.rel(paths.raw_dvc_file)
    if not paths.raw_dvc_file.is_file():
        raise WorkspaceError(f"{workspace}: revision {sha[:12]} has no {dvc_file}; it names no data version")
    pulled = versioning.dvc(workspace, "pull", "--quiet", dvc_file, check=False)
    if pulled.returncode != 0:
        remote = versioning.dvc(workspace, "remote", "default", check=False).stdout.strip() or "(none)"
        raise WorkspaceError(
            f"{workspace}: `dvc pull {dvc_file}` failed from the default DVC remote {remote}: "
            f"{(pulled.stderr or pulled.stdout).strip()[-2000:]}. The worker needs the remote the server "
            "pushes to: `dvc remote modify --local <name> url <shared location>` (docs/operations.md)"
        )
    data = versioning.current_data_version(workspace, paths.raw_dir)
    return Synced(str(workspace), sha, data.dvc_hash, dvc_file, reset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.worker_workspace", description=__doc__.split("\n")[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("revision", help="a commit, branch or tag, e.g. origin/main")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        synced = sync(args.workspace, args.revision, args.params)
    except (WorkspaceError, versioning.CommandError, versioning.DataVersionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({**asdict(synced), "line": synced.line()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
