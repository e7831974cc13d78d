"""Data and code versions: DVC for ``data/raw`` and stage outputs, git for ``.dvc`` files and code.

DVC and git are driven through their command lines (the stable interface), in the project
folder, with the interpreter's own ``bin`` first on PATH so ``dvc repro`` finds ``nerveseg``. The calls
made on every run and every new data version (``init``, the default remote, ``add``, ``push``, ``status``
and ``commit`` of one target) go through DVC's own ``Repo`` API in-process instead (what its command line
calls): a ``python -m dvc`` start costs about a second of CPU, some ten of them a run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml


class CommandError(RuntimeError):
    """An external command (dvc, git) failed; the message carries its output."""


class DataVersionError(RuntimeError):
    """``data/raw`` is not under DVC, or differs from its ``.dvc`` file."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run_command(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        raise CommandError(f"`{' '.join(args)}` failed in {cwd} (exit {proc.returncode}): {output}")
    return proc


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "dvc", *args], Path(root), check)


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_command(["git", *args], Path(root), check)


def _git_identity(root: Path) -> list[str]:
    """Commit as the operator when git knows them; otherwise as the pipeline, rather than fail."""
    name = git(root, "config", "user.name", check=False).stdout.strip()
    email = git(root, "config", "user.email", check=False).stdout.strip()
    args = []
    if not name:
        args += ["-c", "user.name=nerveseg"]
    if not email:
        args += ["-c", "user.email=nerveseg@localhost"]
    return args


def git_commit(root: Path, paths: list[str], message: str) -> str | None:
    """Stage ``paths`` and commit them if anything changed; return the new commit or None."""
    git(root, "add", "--", *paths)
    if git(root, "diff", "--cached", "--quiet", "--", *paths, check=False).returncode == 0:
        return None
    run_command(["git", *_git_identity(root), "commit", "-q", "-m", message, "--", *paths], Path(root))
    return git(root, "rev-parse", "HEAD").stdout.strip()


def code_revision(root: Path) -> tuple[str, bool]:
    """The git commit of the project and whether tracked files differ from it."""
    proc = git(root, "rev-parse", "HEAD", check=False)
    if proc.returncode != 0:
        return "unknown", True
    dirty = bool(git(root, "status", "--porcelain", "--untracked-files=no").stdout.strip())
    return proc.stdout.strip(), dirty


def code_digest() -> str:
    """A hash of the pipeline's own source (``pipeline/`` and ``flows/``), independent of git HEAD,
    which moves with every data or settings commit."""
    import hashlib

    digest = hashlib.sha256()
    package_root = Path(__file__).resolve().parent.parent
    for folder in ("pipeline", "flows"):
        for path in sorted((package_root / folder).rglob("*.py")):
            digest.update(path.relative_to(package_root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_dvc_repo(root: Path, remote_dir: Path) -> None:
    """``dvc init`` if needed and a default local remote if none is configured."""
    root = Path(root)
    if not (root / ".git").exists():
        raise DataVersionError(f"{root}: not a git repository; clone the project or run `git init` first")
    changed = False
    if not (root / ".dvc").is_dir():
        _import_dvc_repo().init(str(root)).close()  # `dvc init`
        changed = True
    with _dvc_repo(root) as repo:
        if not repo.config["core"].get("remote"):  # `dvc remote default` has none
            remote_dir.mkdir(parents=True, exist_ok=True)
            # `dvc remote add -d local DIR`: given relative to the project (the folder DVC works in here), DVC
            # saves it relative to .dvc/config, so clones and copies of the project keep their own remote
            with repo.config.edit() as config:
                config["remote"]["local"] = {"url": os.path.relpath(remote_dir, root)}
                config["core"]["remote"] = "local"
            changed = True
    if changed:  # commit only what this function did, never an operator's own edits
        git_commit(root, [".dvc/config", ".dvc/.gitignore", ".dvcignore"], "dvc: initialise with a local remote")


@dataclass(frozen=True)
class DataVersion:
    dvc_hash: str          # md5 of the directory listing, as in data/raw.dvc
    dvc_file: str          # e.g. data/raw.dvc
    git_revision: str      # last commit that touched the .dvc file
    committed: bool        # the .dvc file in the workspace is the committed one
    n_files: int
    size: int

    def to_dict(self) -> dict:
        return asdict(self)


def read_dvc_file(dvc_file: Path) -> dict:
    if not dvc_file.is_file():
        raise DataVersionError(
            f"{dvc_file}: missing, so the data is not versioned; run `nerveseg quickstart` or "
            f"`dvc add {dvc_file.with_suffix('').name}`"
        )
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    if not outs or "md5" not in outs[0]:
        raise DataVersionError(f"{dvc_file}: has no `outs[0].md5`; re-run `dvc add` on the data folder")
    return outs[0]


def current_data_version(root: Path, raw_dir: Path) -> DataVersion:
    """The DVC version of ``raw_dir``; fails when the folder differs from its ``.dvc`` file."""
    root = Path(root)
    dvc_file = raw_dir.with_name(raw_dir.name + ".dvc")
    out = read_dvc_file(dvc_file)
    rel = dvc_file.relative_to(root).as_posix()
    status = dvc_status(root, rel)
    if status:
        raise DataVersionError(
            f"{raw_dir.relative_to(root)} differs from {rel} ({json.dumps(status)}): version the change with "
            f"`dvc add {raw_dir.relative_to(root)}` and commit {rel}, or restore it with `dvc checkout {rel}`"
        )
    revision = git(root, "log", "-n", "1", "--format=%H", "--", rel, check=False).stdout.strip()
    dirty = bool(git(root, "status", "--porcelain", "--", rel, check=False).stdout.strip())
    return DataVersion(
        dvc_hash=out["md5"],
        dvc_file=rel,
        git_revision=revision or "uncommitted",
        committed=bool(revision) and not dirty,
        n_files=int(out.get("nfiles", 0)),
        size=int(out.get("size", 0)),
    )


def version_data(root: Path, raw_dir: Path, message: str, push: bool = True,
                 also: tuple[str, ...] = ()) -> DataVersion:
    """``dvc add`` the data folder, commit its ``.dvc`` file (and ``also``), push to the default remote."""
    dvc_add(root, raw_dir)
    return commit_data_version(root, raw_dir, message, also=also, push=push)


def dvc_add(root: Path, raw_dir: Path) -> str:
    """``dvc add`` the data folder; returns its DVC hash (``meta`` in the ``.dvc`` file is kept)."""
    from dvc.exceptions import DvcException

    rel = Path(raw_dir).resolve().relative_to(Path(root).resolve()).as_posix()
    try:
        with _dvc_repo(root) as repo:
            repo.add(rel)
    except DvcException as exc:
        raise CommandError(f"`dvc add {rel}` failed in {root}: {exc}") from exc
    return read_dvc_file(raw_dir.with_name(raw_dir.name + ".dvc"))["md5"]


def dvc_push(root: Path, target: str) -> None:
    """``dvc push TARGET`` (a path relative to ``root``) to the default remote."""
    from dvc.exceptions import DvcException

    try:
        with _dvc_repo(root) as repo:
            repo.push(targets=[target])
    except DvcException as exc:
        raise CommandError(f"`dvc push {target}` failed in {root}: {exc}") from exc


def commit_data_version(root: Path, raw_dir: Path, message: str, also: tuple[str, ...] = (),
                        push: bool = True) -> DataVersion:
    """Commit the data folder's ``.dvc`` file (with ``also``, paths under ``root`` that belong to the
    version, in the same commit) and push the data to the default remote."""
    root = Path(root)
    rel = raw_dir.relative_to(root).as_posix()
    gitignore = (raw_dir.parent / ".gitignore").relative_to(root).as_posix()
    git_commit(root, [f"{rel}.dvc", gitignore, *also], message)
    if push:
        dvc_push(root, f"{rel}.dvc")
    return current_data_version(root, raw_dir)


# DVC's API reads some paths against the process's folder (the run cache writes ``dvc.yaml`` from it), as
# its command line does after changing into the project: these calls do the same, one at a time.
_DVC_FOLDER_LOCK = threading.Lock()


def _import_dvc_repo():
    """``dvc.repo.Repo``, without what importing ``dvc`` does for DVC's own command line: its console handlers
    on the ``dvc`` loggers (stdout at INFO, which would land in ``--json`` output) and colorama's wrappers
    around ``sys.stdout``/``sys.stderr``. DVC's warnings then reach this process's logging like any other."""
    out, err = sys.stdout, sys.stderr
    import dvc.logger
    from dvc.repo import Repo

    sys.stdout, sys.stderr = out, err
    for name in ("dvc", "dvc_objects", "dvc_data"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, dvc.logger.LoggerHandler)]:
            logger.removeHandler(handler)
        logger.setLevel(logging.WARNING)
    return Repo


@contextmanager
def _dvc_repo(root: Path):
    Repo = _import_dvc_repo()  # noqa: N806 - a class

    with _DVC_FOLDER_LOCK:
        try:
            before = os.getcwd()
        except FileNotFoundError:  # the folder this process started in is gone
            before = None
        os.chdir(root)
        try:
            with Repo(str(root)) as repo:
                yield repo
        finally:
            os.chdir(before or Path(root).anchor)


def dvc_status(root: Path, target: str | None = None) -> dict:
    """``dvc status --json [target]`` in ``root``: what differs from ``dvc.lock`` and the ``.dvc`` files ({} when
    nothing); ``target`` is a stage name or a path relative to ``root``."""
    from dvc.exceptions import DvcException

    try:
        with _dvc_repo(root) as repo:
            return repo.status(targets=[target] if target else None)
    except DvcException as exc:
        raise CommandError(f"`dvc status {target or ''}` failed in {root}: {exc}") from exc


def stage_is_current(root: Path, stage: str) -> bool:
    """True when DVC says the stage's deps, params and outs match ``dvc.lock`` (False when it cannot say)."""
    try:
        return dvc_status(root, stage) == {}
    except CommandError:
        return False


def commit_stage(root: Path, stage: str) -> None:
    """Record a stage that the flow ran in-process in ``dvc.lock`` and the DVC cache (``dvc commit --force``)."""
    from dvc.exceptions import DvcException

    try:
        with _dvc_repo(root) as repo:
            repo.commit(stage, force=True)
    except DvcException as exc:
        raise CommandError(f"`dvc commit --force {stage}` failed in {root}: {exc}") from exc


def pipeline_status(root: Path) -> dict:
    return dvc_status(root)
