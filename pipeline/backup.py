"""Backups of what a workspace cannot rebuild, and restoring them (``nerveseg backup`` / ``nerveseg restore``).

A backup is one folder, written as ``DIR.partial-XXXX`` beside ``DIR`` and renamed to ``DIR`` only when
complete, so a folder named ``DIR`` is always a whole backup:

- ``workspace.bundle``: ``git bundle --all`` of the project (code, settings, every ``.dvc`` file, the
  recorded split); ``uncommitted.txt`` and ``uncommitted.patch`` when the work tree had changes;
- ``mlflow/mlflow.db`` (SQLite online backup) or ``mlflow/mlflow.pgdump`` (``pg_dump``, postgres profile),
  and ``mlflow/artifacts/``: runs, registered versions, aliases, the promotion ledger, model files;
- ``prefect/prefect.db`` or ``prefect/prefect.pgdump``: deployments, schedules, flow-run history;
- ``dvc/``: every DVC object of every data version in the git history, in a DVC remote's layout
  (``files/md5/xx/...``), pushed there by DVC itself;
- ``gx/``: the Great Expectations project with its Data Docs and drift profiles;
- ``manifest.json``: format version, time, the project's path and git HEAD, what each part holds, and the
  sha256 of every file above. A restore checks every file against it before it writes anything.

The caller (``flows/backup_cli.py``) says where the stores are (:class:`Stores`: which profile, which
databases); this module only reads and writes them. It imports nothing from Prefect: the Prefect database
is a file (``<Prefect home>/prefect.db``) or a PostgreSQL database like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml

from pipeline import versioning
from pipeline.atomic import atomic_output, atomic_write_bytes, atomic_write_text

FORMAT_NAME = "nerveseg-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUNDLE = "workspace.bundle"
UNCOMMITTED_NOTE = "uncommitted.txt"
UNCOMMITTED_PATCH = "uncommitted.patch"
MLFLOW_SQLITE = "mlflow/mlflow.db"
MLFLOW_DUMP = "mlflow/mlflow.pgdump"
MLFLOW_ARTIFACTS = "mlflow/artifacts"
PREFECT_SQLITE = "prefect/prefect.db"
PREFECT_DUMP = "prefect/prefect.pgdump"
USERS_SQLITE = "mlflow/basic_auth.db"
USERS_DUMP = "mlflow/basic_auth.pgdump"
DVC_DIR = "dvc"
GX_DIR = "gx"
# Temporary DVC remotes live in .dvc/config.local (never in git) and only for the length of one call.
BACKUP_REMOTE = "nerveseg-backup"
SOURCE_REMOTE = "nerveseg-backup-source"
RESTORE_REMOTE = "nerveseg-restore"
TARGET_REMOTE = "nerveseg-restore-target"
BACKUP_REFS = "refs/remotes/nerveseg-backup"  # where a restore into an existing clone puts the bundle's refs

Echo = Callable[[str], None]


class BackupError(RuntimeError):
    """A backup or restore refused or failed; the message names the file, the rule and what to do."""


class BackupUsageError(BackupError):
    """The folder given cannot be used (not empty, not a backup, not a clone of this project)."""


@dataclass(frozen=True)
class Stores:
    """Where a workspace keeps what cannot be rebuilt. ``*_postgres``: the libpq URL of that store's
    database (``postgresql://USER@HOST:PORT/DB``) when the services run the postgres profile."""

    root: Path
    raw_dvc_file: Path
    mlflow_db: Path
    mlflow_artifacts: Path
    prefect_db: Path
    gx_dir: Path
    mlflow_postgres: str | None = None
    prefect_postgres: str | None = None
    pg_password: str | None = field(default=None, repr=False)  # given to pg_dump as PGPASSWORD, never argv
    # MLflow's basic-auth users and permissions (services ``auth: true``): a file, or a database
    users_db: Path | None = None
    users_postgres: str | None = None

    @classmethod
    def of(cls, paths, mlflow_postgres: str | None = None, prefect_postgres: str | None = None,
           pg_password: str | None = None, users_postgres: str | None = None) -> "Stores":
        """From a :class:`pipeline.paths.ProjectPaths`."""
        return cls(root=paths.root, raw_dvc_file=paths.raw_dvc_file, mlflow_db=paths.mlflow_dir / "mlflow.db",
                   mlflow_artifacts=paths.mlflow_dir / "artifacts", prefect_db=paths.prefect_home / "prefect.db",
                   gx_dir=paths.gx_dir / "gx", mlflow_postgres=mlflow_postgres, prefect_postgres=prefect_postgres,
                   pg_password=pg_password, users_db=paths.mlflow_dir / "basic_auth.db",
                   users_postgres=users_postgres)


@dataclass(frozen=True)
class Database:
    """One database store as a backup holds it: a SQLite file, a PostgreSQL database, or both (a SQLite file
    left from embedded runs beside the postgres profile's database)."""

    part: str              # its key in the manifest's parts
    label: str
    holds: str
    sqlite_file: Path
    sqlite_rel: str        # where the backup keeps the snapshot
    dump_rel: str          # where the backup keeps the pg_dump
    records: tuple[str, ...]  # tables whose rows make a store worth refusing to overwrite
    pg_url: str | None = None
    pg_password: str | None = field(default=None, repr=False)


MLFLOW_RECORDS = ("runs", "registered_models", "model_versions", "logged_models")
PREFECT_RECORDS = ("flow_run", "deployment", "flow")
USERS_RECORDS = ("users",)


def databases(stores: Stores) -> list[Database]:
    """The MLflow store and the Prefect database of ``stores``."""
    return [
        Database("mlflow_store", "mlflow", "MLflow runs, registered versions, aliases and the promotion ledger",
                 stores.mlflow_db, MLFLOW_SQLITE, MLFLOW_DUMP, MLFLOW_RECORDS, stores.mlflow_postgres,
                 stores.pg_password),
        Database("prefect_db", "prefect", "Prefect: deployments, schedules, flow-run history", stores.prefect_db,
                 PREFECT_SQLITE, PREFECT_DUMP, PREFECT_RECORDS, stores.prefect_postgres, stores.pg_password),
        Database("mlflow_users", "mlflow users", "MLflow logins and permissions (services with auth: true)",
                 stores.users_db or stores.mlflow_db.with_name("basic_auth.db"), USERS_SQLITE, USERS_DUMP,
                 USERS_RECORDS, stores.users_postgres, stores.pg_password),
    ]


@dataclass(frozen=True)
class DataVersionRef:
    """One version of the data folder: the commit of its ``.dvc`` file and the DVC hash it names."""

    revision: str          # a commit, or "workspace" for an uncommitted .dvc file
    dvc_hash: str          # as in the .dvc file, e.g. 1f2e...c3.dir
    legacy: bool = False   # a DVC 2 hash (no ``hash: md5`` line): stored outside files/md5


@dataclass
class Report:
    """What a backup wrote (each part) and what it knows it left out, for the manifest."""

    parts: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Small helpers: hashing, copying, atomic writes
# --------------------------------------------------------------------------------------------
def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _progress(items, progress: bool, desc: str, unit: str = "file"):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)


def _copy_tree(src: Path, dst: Path, progress: bool, desc: str) -> dict:
    """Copy every file under ``src`` to ``dst``; counts of what was copied."""
    files = _files_under(src)
    size = 0
    for path in _progress(files, progress, desc):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        size += target.stat().st_size
    return {"files": len(files), "bytes": size}


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy under a temporary name, then rename: a reader (DVC, GX) never sees half a file."""
    with atomic_output(dst) as tmp:
        shutil.copy2(src, tmp)


def _write_json_atomic(path: Path, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _safe_relpath(rel: str, where: Path) -> Path:
    """A manifest's path, refused when it would lead outside the backup (a doctored manifest)."""
    path = Path(rel)
    if path.is_absolute() or ".." in path.parts or not rel:
        raise BackupError(f"{where / MANIFEST}: lists {rel!r}, which is not a path inside the backup; "
                          "the manifest was changed after the backup: restore from another backup")
    return where / path


# --------------------------------------------------------------------------------------------
# SQLite: consistent snapshots and the workspace path inside them
# --------------------------------------------------------------------------------------------
def sqlite_snapshot(src: Path, dest: Path) -> dict:
    """Copy a live SQLite database with SQLite's online backup API: a consistent snapshot even while a
    server writes to it (a plain file copy can catch half a transaction or miss the WAL)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(f"{src.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
    try:
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            checked = target.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            target.close()
    finally:
        source.close()
    if checked != "ok":
        raise BackupError(f"{src}: the snapshot fails SQLite's quick_check ({checked}); the store may be damaged: "
                          "check it with `sqlite3 FILE 'PRAGMA integrity_check'` before relying on this backup")
    return {"bytes": dest.stat().st_size, "tables": _sqlite_table_count(dest)}


def _sqlite_table_count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def prefix_pairs(old_root: str, new_root: str) -> list[tuple[str, str]]:
    """(old, new) forms of the workspace path, in the order to replace them: first as a ``file://`` URI
    (percent-encoded: a new path with a space must become ``%20`` there), then the plain path."""
    return [(Path(old_root).as_uri(), Path(new_root).as_uri()), (old_root, new_root)]


def _plain_tables(conn: sqlite3.Connection) -> list[str]:
    """Ordinary tables: not SQLite's own, not virtual tables nor their shadow tables (writing those
    directly would corrupt the index they belong to)."""
    rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
    virtual = [name for name, sql in rows if (sql or "").upper().startswith("CREATE VIRTUAL TABLE")]
    return [name for name, _ in rows if not name.startswith("sqlite_") and name not in virtual
            and not any(name.startswith(f"{v}_") for v in virtual)]


def rewrite_sqlite_prefix(db: Path, old_root: str, new_root: str) -> int:
    """Replace the old workspace path by the new one in every text value of every table: MLflow keeps
    absolute ``file://`` locations (experiments, runs, model versions, logged models), and nothing loads
    from a workspace restored elsewhere without this. Returns the number of values changed."""
    if old_root == new_root:
        return 0
    changed = 0
    conn = sqlite3.connect(db)
    try:
        with conn:  # one transaction: all or nothing
            for table in _plain_tables(conn):
                columns = [row[1] for row in conn.execute(f"PRAGMA table_info({_quote_ident(table)})")]
                for column in columns:
                    for old, new in prefix_pairs(old_root, new_root):
                        changed += _rewrite_column(conn, table, column, old, new)
    finally:
        conn.close()
    return changed


def _rewrite_column(conn: sqlite3.Connection, table: str, column: str, old: str, new: str) -> int:
    col = _quote_ident(column)
    # The path itself, or the path followed by "/": never another folder whose name starts with it.
    cursor = conn.execute(
        f"UPDATE {_quote_ident(table)} SET {col} = CASE WHEN {col} = ? THEN ? ELSE replace({col}, ?, ?) END "
        f"WHERE typeof({col}) = 'text' AND ({col} = ? OR instr({col}, ?) > 0)",
        (old, new, old + "/", new + "/", old, old + "/"))
    return max(cursor.rowcount, 0)


def sqlite_holds_records(db: Path, tables: tuple[str, ...]) -> bool:
    """True when any of ``tables`` exists in ``db`` with at least one row."""
    if not db.is_file() or db.stat().st_size == 0:
        return False
    try:
        with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as conn:
            present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return any(conn.execute(f"SELECT 1 FROM {_quote_ident(t)} LIMIT 1").fetchone()
                       for t in tables if t in present)
    except sqlite3.DatabaseError:
        return True  # not readable as SQLite: never overwrite what we cannot judge


def restore_sqlite(src: Path, dest: Path, old_root: str, new_root: str) -> dict:
    """Put a snapshot in place at ``dest``, with the workspace path rewritten, under a temporary name
    first, so ``dest`` is always either the old store or the whole new one."""
    with atomic_output(dest) as tmp:
        tmp.unlink()  # the snapshot creates its own database file
        sqlite_snapshot(src, tmp)
        changed = rewrite_sqlite_prefix(tmp, old_root, new_root)
        for stale in (dest.with_name(dest.name + "-wal"), dest.with_name(dest.name + "-shm")):
            stale.unlink(missing_ok=True)  # a WAL of the replaced store would be replayed into the new one
    return {"rewritten_values": changed}


# --------------------------------------------------------------------------------------------
# PostgreSQL (postgres profile): pg_dump / pg_restore
# --------------------------------------------------------------------------------------------
def _tool(name: str, why: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise BackupError(f"{name} not found on PATH, and {why}: install the PostgreSQL client tools of the "
                          f"server's major version (Debian: `apt-get install postgresql-client`), or put {name} "
                          "on PATH, then run the command again")
    return exe


def _libpq(url: str, password: str | None = None) -> tuple[str, dict]:
    """The URL without a password and the environment with it as ``PGPASSWORD`` (a command line can be read
    by every user of the machine). Without one, libpq's own ``PGPASSWORD`` or ``~/.pgpass`` apply."""
    parts = urlsplit(url)
    env = dict(os.environ)
    if password:
        env["PGPASSWORD"] = password
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
        netloc = (parts.username or "") + "@" + (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=netloc))
    scheme = parts.scheme.split("+")[0]  # SQLAlchemy's postgresql+psycopg2:// is plain postgresql:// to libpq
    return urlunsplit(urlsplit(url)._replace(scheme=scheme)), env


def _shown(url: str) -> str:
    return _libpq(url)[0]


def pg_dump(url: str, dest: Path, password: str | None = None) -> dict:
    exe = _tool("pg_dump", f"the store {_shown(url)} is a PostgreSQL database (postgres profile)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    conn, env = _libpq(url, password)
    done = subprocess.run([exe, "--format=custom", "--no-owner", "--no-privileges", f"--file={dest}",
                           f"--dbname={conn}"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackupError(f"pg_dump of {conn} failed (exit {done.returncode}): {done.stderr.strip()}; check that "
                          "the server runs and that pg_dump's major version is at least the server's")
    return {"bytes": dest.stat().st_size, "database": conn}


def _pg_connect(url: str, password: str | None):
    import psycopg2

    conn_url, env = _libpq(url, password)
    return psycopg2.connect(conn_url, password=env.get("PGPASSWORD"), connect_timeout=10)


def pg_holds_tables(url: str, password: str | None = None) -> bool:
    conn = _pg_connect(url, password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
            return cur.fetchone()[0] > 0
    finally:
        conn.close()


def pg_restore(src: Path, url: str, old_root: str, new_root: str, password: str | None = None) -> dict:
    """Load a dump into the (existing) database at ``url``, replacing what it holds, then rewrite the
    workspace path in its text columns as for SQLite."""
    exe = _tool("pg_restore", f"the backup holds {src.name}, a PostgreSQL dump")
    conn, env = _libpq(url, password)
    done = subprocess.run([exe, "--clean", "--if-exists", "--no-owner", "--no-privileges", "--single-transaction",
                           f"--dbname={conn}", str(src)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackupError(f"pg_restore of {src} into {conn} failed (exit {done.returncode}): {done.stderr.strip()}")
    return {"rewritten_values": rewrite_pg_prefix(url, old_root, new_root, password), "database": conn}


def rewrite_pg_prefix(url: str, old_root: str, new_root: str, password: str | None = None) -> int:
    """:func:`rewrite_sqlite_prefix` for a PostgreSQL database: every text column of every table."""
    if old_root == new_root:
        return 0
    conn = _pg_connect(url, password)
    changed = 0
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = "
                        "'public' AND data_type IN ('text', 'character varying') AND table_name IN (SELECT "
                        "table_name FROM information_schema.tables WHERE table_schema = 'public' AND "
                        "table_type = 'BASE TABLE')")
            for table, column in cur.fetchall():
                t, c = _quote_ident(table), _quote_ident(column)
                for old, new in prefix_pairs(old_root, new_root):
                    cur.execute(f"UPDATE {t} SET {c} = CASE WHEN {c} = %s THEN %s ELSE replace({c}, %s, %s) END "
                                f"WHERE {c} = %s OR strpos({c}, %s) > 0",
                                (old, new, old + "/", new + "/", old, old + "/"))
                    changed += max(cur.rowcount, 0)
    finally:
        conn.close()
    return changed


# --------------------------------------------------------------------------------------------
# git: the bundle and the uncommitted changes
# --------------------------------------------------------------------------------------------
def _git_bytes(root: Path, *args: str) -> bytes:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True)
    if done.returncode != 0:
        raise BackupError(f"`git {' '.join(args)}` failed in {root}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def backup_git(root: Path, dest: Path, echo: Echo) -> dict:
    """``git bundle create --all`` and, when the work tree differs from HEAD, a note and a patch."""
    head = versioning.git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False).stdout.strip()
    if not head:
        raise BackupError(f"{root}: the git repository has no commit, so there is nothing to bundle; commit the "
                          "project first")
    versioning.git(root, "bundle", "create", "-q", str(dest / BUNDLE), "--all")
    refs = versioning.git(root, "bundle", "list-heads", str(dest / BUNDLE)).stdout.splitlines()
    roots = versioning.git(root, "rev-list", "--max-parents=0", "--all").stdout.split()
    branch = versioning.git(root, "symbolic-ref", "--short", "-q", "HEAD", check=False).stdout.strip()
    part = {"holds": "the git history of the workspace: code, settings, every .dvc file and recorded split",
            "file": BUNDLE, "head": head, "branch": branch or None, "refs": len(refs), "root_commits": roots,
            "uncommitted": _note_uncommitted(root, dest, echo)}
    echo(f"workspace: git bundle of {len(refs)} refs, HEAD {head[:12]}{f' ({branch})' if branch else ''}")
    return part


def _note_uncommitted(root: Path, dest: Path, echo: Echo) -> dict | None:
    status = versioning.git(root, "status", "--porcelain", "--untracked-files=all").stdout
    if not status.strip():
        return None
    lines = status.splitlines()
    atomic_write_text(dest / UNCOMMITTED_NOTE, 
        "The work tree differed from HEAD when this backup was taken. workspace.bundle holds only commits;\n"
        f"{UNCOMMITTED_PATCH} holds the changes to tracked files (apply with `git apply --binary`);\n"
        "untracked files (??) are listed but not saved.\n\n" + status)
    atomic_write_bytes(dest / UNCOMMITTED_PATCH, _git_bytes(root, "diff", "HEAD", "--binary"))
    untracked = sum(1 for line in lines if line.startswith("??"))
    echo(f"WARNING: {len(lines)} uncommitted changes ({untracked} untracked files) are not in the git bundle; "
         f"listed in {UNCOMMITTED_NOTE}, tracked changes saved as {UNCOMMITTED_PATCH}. Commit what should be kept.")
    return {"files": len(lines), "untracked": untracked, "note": UNCOMMITTED_NOTE, "patch": UNCOMMITTED_PATCH}


# --------------------------------------------------------------------------------------------
# DVC: every object of every data version
# --------------------------------------------------------------------------------------------
def data_versions(root: Path, dvc_file: Path) -> list[DataVersionRef]:
    """Every version of the data folder: each commit (any branch or tag) of its ``.dvc`` file, and the
    work tree's own when it names a version no commit has."""
    rel = dvc_file.relative_to(root).as_posix()
    seen: dict[str, DataVersionRef] = {}
    log = versioning.git(root, "log", "--all", "--format=%H", "--", rel, check=False).stdout.split()
    for revision in reversed(log):  # oldest first: a hash keeps the first commit that made it
        shown = versioning.git(root, "show", f"{revision}:{rel}", check=False)
        ref = _version_of(shown.stdout, revision) if shown.returncode == 0 else None
        if ref and ref.dvc_hash not in seen:
            seen[ref.dvc_hash] = ref
    if dvc_file.is_file():
        ref = _version_of(dvc_file.read_text(), "workspace")
        if ref and ref.dvc_hash not in seen:
            seen[ref.dvc_hash] = ref
    return list(seen.values())


def _version_of(text: str, revision: str) -> DataVersionRef | None:
    try:
        outs = (yaml.safe_load(text) or {}).get("outs") or []
    except yaml.YAMLError:
        return None
    if not outs or not outs[0].get("md5"):
        return None
    return DataVersionRef(revision, outs[0]["md5"], legacy=outs[0].get("hash") != "md5")


def _object_path(odb_root: Path, md5: str, legacy: bool) -> Path:
    """DVC 3 keeps objects under ``files/md5/xx/rest``; DVC 2's under ``xx/rest`` (both in caches and remotes)."""
    base = odb_root if legacy else odb_root / "files" / "md5"
    return base / md5[:2] / md5[2:]


def missing_objects(odb_root: Path, versions: list[DataVersionRef],
                    listings: Path | None = None) -> dict[str, list[str]]:
    """Per data version (``revision dvc_hash``), the objects that ``odb_root`` (a cache or local remote)
    lacks. A directory's listing (``.dir``) is read from ``odb_root``, else from ``listings``."""
    missing: dict[str, list[str]] = {}
    for ref in versions:
        lacking = []
        head = _object_path(odb_root, ref.dvc_hash, ref.legacy)
        if not head.is_file():
            lacking.append(ref.dvc_hash)
        if ref.dvc_hash.endswith(".dir"):
            listing_file = head if head.is_file() else (
                _object_path(listings, ref.dvc_hash, ref.legacy) if listings else None)
            if listing_file is None or not listing_file.is_file():
                lacking.append("(the folder's listing is lost, so which files it held is unknown)")
            else:
                for entry in json.loads(listing_file.read_text()):
                    if not _object_path(odb_root, entry["md5"], ref.legacy).is_file():
                        lacking.append(f"{entry['md5']} ({entry.get('relpath')})")
        if lacking:
            missing[f"{ref.revision[:12]} {ref.dvc_hash}"] = lacking
    return missing


def _dvc_quiet(root: Path, *args: str) -> subprocess.CompletedProcess:
    """A DVC call whose exit code alone does not decide: ``--all-commits`` also reaches stage outputs of old
    commits that were never cached; what matters (every data version complete) is checked afterwards."""
    return versioning.dvc(root, *args, check=False)


@contextmanager
def temporary_remotes(root: Path, remotes: dict[str, str]) -> Iterator[None]:
    """DVC remotes for one call, in ``.dvc/config.local`` (never in git); the file is put back exactly as
    it was afterwards, whatever happens."""
    local = Path(root) / ".dvc" / "config.local"
    before = local.read_bytes() if local.is_file() else None
    try:
        for name, url in remotes.items():
            versioning.dvc(root, "remote", "add", "--local", "--force", name, url)
        yield
    finally:
        if before is None:
            local.unlink(missing_ok=True)
        else:
            atomic_write_bytes(local, before)


def default_remote(root: Path) -> tuple[str, str] | None:
    """(name, url) of the default DVC remote; a local remote's url comes back as an absolute path."""
    name = versioning.dvc(root, "remote", "default", check=False).stdout.strip()
    if not name:
        return None
    url = versioning.dvc(root, "config", f"remote.{name}.url", check=False).stdout.strip()
    return (name, url) if url else None


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(unquote(urlsplit(url).path)) if url.startswith("file://") else Path(url)


def _remote_for_all_commits(root: Path, remote: tuple[str, str], temp_name: str) -> tuple[str, dict[str, str]]:
    """The remote name to use with ``--all-commits``, and the temporary remotes that needs. DVC resolves a
    relative local remote (``../dvc-remote``) of an old commit against the root of that commit's tree,
    i.e. ``/dvc-remote``: a local remote is therefore named by its absolute path under a temporary name."""
    name, url = remote
    if _is_local(url):
        return temp_name, {temp_name: str(_local_path(url).resolve())}
    return name, {}


def backup_dvc(stores: Stores, dest: Path, allow_missing: bool, echo: Echo) -> dict:
    """Every object of every data version into ``dest`` (a DVC remote's layout), through DVC: objects only
    in the default remote are fetched into the cache first, then all are pushed to ``dest``."""
    root = stores.root
    versions = data_versions(root, stores.raw_dvc_file)
    remote = default_remote(root)
    temps = {BACKUP_REMOTE: str(dest.resolve())}
    source = None
    if remote:
        source, extra = _remote_for_all_commits(root, remote, SOURCE_REMOTE)
        temps.update(extra)
    dest.mkdir(parents=True, exist_ok=True)
    with temporary_remotes(root, temps):
        said = []
        if source:
            echo(f"dvc: fetching every commit's objects from the remote {remote[0]} ({remote[1]}) into the cache")
            said.append(_dvc_quiet(root, "fetch", "-q", "--all-commits", "-r", source))
        echo(f"dvc: pushing the objects of {len(versions)} data versions (and cached stage outputs)")
        said.append(_dvc_quiet(root, "push", "-q", "--all-commits", "-r", BACKUP_REMOTE))
    missing = missing_objects(dest, versions, listings=_cache_dir(root))
    if missing and not allow_missing:
        raise BackupError(_missing_message(missing, "neither the DVC cache nor the default remote holds them")
                          + "; restore them from another copy (`dvc push` from a workspace that has them), or "
                          "accept the gap with --allow-missing-data (recorded in the manifest)" + _dvc_said(said))
    return {"holds": "every DVC object of every data version in the git history (a DVC remote's layout)",
            "path": DVC_DIR,
            "data_versions": [{"revision": v.revision, "dvc_hash": v.dvc_hash, "legacy": v.legacy} for v in versions],
            "objects": len(_files_under(dest)), "missing": missing}


def _dvc_said(procs: list[subprocess.CompletedProcess]) -> str:
    """DVC's own complaint, if any (its lock held by a running flow, an unreachable remote)."""
    words = " ".join((p.stderr or p.stdout or "").strip() for p in procs if p.returncode != 0).strip()
    return f". DVC said: {words[-800:]}" if words else ""


def _missing_message(missing: dict[str, list[str]], why: str) -> str:
    shown = "; ".join(f"data version {k}: {len(v)} objects ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                      for k, v in missing.items())
    return f"{len(missing)} data versions are incomplete ({why}): {shown}"


def _cache_dir(root: Path) -> Path:
    out = versioning.dvc(root, "cache", "dir", check=False).stdout.strip()
    return Path(out) if out else Path(root) / ".dvc" / "cache"


# --------------------------------------------------------------------------------------------
# Backup
# --------------------------------------------------------------------------------------------
def refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BackupUsageError(f"{out}: exists and is not an empty folder; a backup goes into a new or empty "
                               "folder and never mixes with another: give another --out")


def create_backup(stores: Stores, out: Path, allow_missing_data: bool = False, echo: Echo = print,
                  progress: bool = True, warnings: tuple[str, ...] = ()) -> dict:
    """Write a backup of ``stores`` to ``out`` (a new or empty folder); returns its manifest. ``warnings``:
    what the caller knows is left out (stores elsewhere), recorded in the manifest.

    Built in ``out.partial-XXXX`` beside it and renamed at the end: ``out`` never holds half a backup."""
    out = Path(os.path.abspath(out))
    refuse_non_empty(out)
    _check_tools(stores)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
    try:
        report = _write_parts(stores, partial, allow_missing_data, echo, progress)
        report.warnings.extend(warnings)
        manifest = _manifest(stores, report, partial, progress)
        _write_json_atomic(partial / MANIFEST, manifest)
        _publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _check_tools(stores: Stores) -> None:
    """Fail before any work when a tool the profile needs is missing."""
    for url in (stores.mlflow_postgres, stores.prefect_postgres, stores.users_postgres):
        if url:
            _tool("pg_dump", f"the store {_shown(url)} is a PostgreSQL database (postgres profile)")


def _write_parts(stores: Stores, dest: Path, allow_missing_data: bool, echo: Echo, progress: bool) -> Report:
    report = Report()
    report.parts["workspace"] = backup_git(stores.root, dest, echo)
    if report.parts["workspace"]["uncommitted"]:
        report.warnings.append(f"uncommitted changes are not in the bundle: see {UNCOMMITTED_NOTE}")
    # The databases before the files they point at: a file newer than its record is harmless, a record
    # whose file was not copied yet is not.
    for db in databases(stores):
        report.parts[db.part] = _backup_database(db, dest, stores.root, echo)
    report.parts["mlflow_artifacts"] = _backup_tree(stores.mlflow_artifacts, dest / MLFLOW_ARTIFACTS,
                                                    "MLflow artifacts: model files, reports, splits, cards",
                                                    MLFLOW_ARTIFACTS, stores.root, progress, echo)
    report.parts["dvc"] = backup_dvc(stores, dest / DVC_DIR, allow_missing_data, echo)
    report.parts["gx"] = _backup_tree(stores.gx_dir, dest / GX_DIR, "the Great Expectations project: suite, "
                                      "checkpoint, drift profiles, Data Docs", GX_DIR, stores.root, progress, echo)
    return report


def _backup_database(db: Database, dest: Path, root: Path, echo: Echo) -> dict:
    """PostgreSQL with the postgres profile (and the SQLite file too, when one was left from embedded
    runs), else the SQLite file if it exists."""
    part: dict = {"holds": db.holds}
    if db.pg_url:
        part["postgres"] = {"file": db.dump_rel, **pg_dump(db.pg_url, dest / db.dump_rel, db.pg_password)}
        echo(f"{db.label}: pg_dump of {_shown(db.pg_url)} -> {db.dump_rel}")
    if db.sqlite_file.is_file():
        part["sqlite"] = {"file": db.sqlite_rel, "source": _rel(db.sqlite_file, root),
                          **sqlite_snapshot(db.sqlite_file, dest / db.sqlite_rel)}
        echo(f"{db.label}: SQLite snapshot of {_rel(db.sqlite_file, root)} ({part['sqlite']['bytes'] / 1e6:.1f} MB)")
    if not db.pg_url and not db.sqlite_file.is_file():
        part["absent"] = f"{_rel(db.sqlite_file, root)} does not exist (nothing was recorded there yet)"
        echo(f"{db.label}: {part['absent']}")
    return part


def _backup_tree(src: Path, dst: Path, holds: str, rel: str, root: Path, progress: bool, echo: Echo) -> dict:
    if not src.is_dir():
        return {"holds": holds, "absent": f"{_rel(src, root)} does not exist"}
    counts = _copy_tree(src, dst, progress, rel)
    echo(f"{rel}: {counts['files']} files ({counts['bytes'] / 1e6:.1f} MB)")
    return {"holds": holds, "path": rel, "source": _rel(src, root), **counts}


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def _manifest(stores: Stores, report: Report, folder: Path, progress: bool) -> dict:
    files = {}
    for path in _progress(_files_under(folder), progress, "sha256"):
        files[path.relative_to(folder).as_posix()] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created": _now(),
            "project": str(stores.root), "git_head": report.parts["workspace"]["head"],
            "parts": report.parts, "warnings": report.warnings, "files": files}


def _publish(partial: Path, out: Path) -> None:
    """Rename the finished backup to its name; an empty ``out`` is replaced (rename(2) allows that)."""
    try:
        os.replace(partial, out)
    except OSError as exc:
        raise BackupUsageError(f"{out}: could not be replaced by the finished backup ({exc.strerror}); it was "
                               "filled by someone else meanwhile: give another --out") from exc


# --------------------------------------------------------------------------------------------
# Restore: verify, workspace, stores
# --------------------------------------------------------------------------------------------
def read_manifest(backup: Path) -> dict:
    path = backup / MANIFEST
    if not path.is_file():
        partial = "; a folder named *.partial-* is an unfinished backup" if ".partial-" in backup.name else ""
        raise BackupUsageError(f"{path}: missing, so {backup} is not a nerveseg backup{partial}; give the folder "
                               "that `nerveseg backup --out` wrote")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise BackupError(f"{path}: not valid JSON ({exc}); the manifest is damaged: restore from another "
                          "backup") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise BackupUsageError(f"{path}: format {manifest.get('format')!r} is not {FORMAT_NAME!r}; not a nerveseg "
                               "backup")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise BackupError(f"{path}: backup format {manifest['format_version']} is newer than this nerveseg reads "
                          f"({FORMAT_VERSION}); restore with the nerveseg version that wrote it")
    return manifest


def verify_backup(backup: Path, progress: bool = True) -> dict:
    """Check every file the manifest lists (present, sha256) before anything is restored; returns the
    manifest. Files the manifest does not list are never restored (and named in ``unlisted``)."""
    backup = Path(backup).resolve()
    manifest = read_manifest(backup)
    problems = []
    for rel, info in _progress(list(manifest["files"].items()), progress, "verify"):
        path = _safe_relpath(rel, backup)
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (actual := sha256_of(path)) != info["sha256"]:
            problems.append(f"{path}: sha256 {actual} does not match the manifest's {info['sha256']}")
    if problems:
        raise BackupError(f"{backup}: {len(problems)} files fail the check against {MANIFEST}, so the backup was "
                          f"changed or damaged after it was written; nothing was restored. Restore from another "
                          f"backup, or copy these files again from the original medium: " + "; ".join(problems[:10])
                          + ("; ..." if len(problems) > 10 else ""))
    listed = set(manifest["files"]) | {MANIFEST}
    manifest["unlisted"] = [p.relative_to(backup).as_posix() for p in _files_under(backup)
                            if p.relative_to(backup).as_posix() not in listed]
    return manifest


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def target_is_empty(into: Path) -> bool:
    """True when ``into`` is missing or an empty folder: a restore clones the bundle there."""
    return not _has_files(Path(into))


def clone_bundle(backup: Path, into: Path, echo: Echo = print) -> Path:
    """A new workspace from the bundle, in a missing or empty folder ``into``."""
    into = Path(os.path.abspath(into))
    into.mkdir(parents=True, exist_ok=True)
    versioning.git(into, "clone", "-q", str(Path(backup).resolve() / BUNDLE), ".")
    echo(f"workspace: cloned the bundle into {into} (its `origin` is the bundle; point it at your repository "
         "with `git remote set-url origin URL`)")
    return into.resolve()


def check_same_repository(into: Path, manifest: dict) -> Path:
    """``into`` must be the top of a clone of the backed-up repository (they share a root commit)."""
    into = Path(os.path.abspath(into))
    top = versioning.git(into, "rev-parse", "--show-toplevel", check=False) if into.is_dir() else None
    if top is None or top.returncode != 0 or Path(top.stdout.strip()).resolve() != into.resolve():
        raise BackupUsageError(f"{into}: not empty and not the top of a git clone; restore into an empty folder "
                               "(--into NEW_DIR), or into a fresh clone of the project")
    ours = set(versioning.git(into, "rev-list", "--max-parents=0", "--all", check=False).stdout.split())
    theirs = set(manifest["parts"]["workspace"]["root_commits"])
    if not ours & theirs:
        raise BackupUsageError(f"{into}: its git history shares no root commit with the backup's, so it is a clone "
                               "of another repository; restore into an empty folder or a clone of this project")
    return into.resolve()


def fetch_bundle(backup: Path, root: Path, echo: Echo = print) -> None:
    """Every commit of the bundle into an existing clone, under ``refs/remotes/nerveseg-backup/``: the
    clone's own branches stay as they are, and DVC's ``--all-commits`` sees every data version."""
    versioning.git(root, "fetch", "-q", "--no-tags", str(Path(backup).resolve() / BUNDLE),
                   f"+refs/heads/*:{BACKUP_REFS}/*", f"+refs/tags/*:{BACKUP_REFS}/tags/*")
    echo(f"workspace: {root} is a clone of the backed-up repository; the bundle's branches are in {BACKUP_REFS}/")


def workspace_notes(root: Path, manifest: dict, backup: Path) -> list[str]:
    """What an operator should know about the restored workspace's git state."""
    notes = []
    head = versioning.git(root, "rev-parse", "HEAD", check=False).stdout.strip()
    if head and head != manifest["git_head"]:
        notes.append(f"the workspace's HEAD is {head[:12]}, the backup's was {manifest['git_head'][:12]} (in "
                     f"{BACKUP_REFS}/); `git checkout` it if the workspace should be as it was")
    uncommitted = manifest["parts"]["workspace"].get("uncommitted")
    if uncommitted:
        where = Path(backup).resolve()
        notes.append(f"the backed-up work tree had {uncommitted['files']} uncommitted changes: see "
                     f"{where / uncommitted['note']}; gx/ is restored as it was, and `git apply --binary "
                     f"--exclude='gx/*' {where / uncommitted['patch']}` puts the other tracked changes back")
    return notes


def check_restorable(stores: Stores, manifest: dict, force: bool) -> None:
    """Refuse before anything is written: a store that already holds records (unless ``force``), or
    servers that have the stores open."""
    from pipeline.service_state import pid_alive, read_state

    state = read_state(stores.root) or {}
    running = [s for s in ("prefect", "mlflow", "worker") if pid_alive((state.get(s) or {}).get("pid"))]
    if running:
        raise BackupError(f"{stores.root}: the project's services are running ({', '.join(running)}) and hold the "
                          "stores open; stop them with `nerveseg services down`, restore, then `nerveseg services up`")
    if force:
        return
    parts = manifest["parts"]
    occupied = [str(stores.mlflow_artifacts)] if ("absent" not in parts["mlflow_artifacts"]
                                                  and _has_files(stores.mlflow_artifacts)) else []
    for db in databases(stores):
        part = parts.get(db.part, {})
        if "sqlite" in part and sqlite_holds_records(db.sqlite_file, db.records):
            occupied.append(str(db.sqlite_file))
        if "postgres" in part and db.pg_url and pg_holds_tables(db.pg_url, db.pg_password):
            occupied.append(_shown(db.pg_url))
    if occupied:
        raise BackupError(f"{', '.join(occupied)}: already hold{'s' if len(occupied) == 1 else ''} records, which a "
                          "restore would replace; nothing was restored. Back them up first (`nerveseg backup --out "
                          "DIR`), then restore with --force, or restore into an empty folder (--into NEW_DIR)")


def restore_stores(backup: Path, manifest: dict, stores: Stores, echo: Echo = print, progress: bool = True) -> dict:
    """Put every part of a verified backup into the workspace of ``stores``: gx/, the DVC objects (cache and
    default remote, then the current data version checked out), the MLflow store and artifacts with the
    workspace path rewritten, the Prefect database."""
    backup = Path(backup).resolve()
    old_root, new_root = manifest["project"], str(stores.root)
    done: dict = {}
    done["gx"] = _restore_tree(backup, manifest, GX_DIR, stores.gx_dir, progress)
    echo(f"gx: {done['gx']['files']} files restored")
    done["dvc"] = restore_dvc(backup, manifest, stores, echo)
    if "absent" not in manifest["parts"]["mlflow_artifacts"]:  # never empty a folder the backup had nothing for
        done["mlflow_artifacts"] = _restore_tree(backup, manifest, MLFLOW_ARTIFACTS, stores.mlflow_artifacts,
                                                 progress, replace=True)
        echo(f"mlflow artifacts: {done['mlflow_artifacts']['files']} files restored")
    for db in databases(stores):
        done[db.part] = _restore_database(backup, manifest["parts"].get(db.part, {}), db, old_root, new_root, echo)
    return done


def _restore_tree(backup: Path, manifest: dict, prefix: str, dest: Path, progress: bool,
                  replace: bool = False) -> dict:
    """The manifest's files under ``prefix`` into ``dest`` (only those: a file slipped into the backup
    later is never restored). ``replace``: build beside ``dest`` and swap, so ``dest`` is never half old,
    half new."""
    files = [rel for rel in manifest["files"] if rel.startswith(prefix + "/")]
    target = dest.with_name(f".{dest.name}.restore-{os.getpid()}") if replace else dest
    try:
        for rel in _progress(files, progress, prefix):
            _copy_atomic(_safe_relpath(rel, backup), target / Path(rel).relative_to(prefix))
        if replace:
            _swap_in(target, dest)
    finally:
        if replace and target.exists():
            shutil.rmtree(target, ignore_errors=True)
    return {"files": len(files)}


def _swap_in(new: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.replaced-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    if new.exists():
        os.replace(new, dest)
    else:
        dest.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(old, ignore_errors=True)


def _restore_database(backup: Path, part: dict, db: Database, old_root: str, new_root: str, echo: Echo) -> dict:
    done = {}
    moved = f" (the old workspace path {old_root} rewritten in " if old_root != new_root else ""
    if "postgres" in part:
        if not db.pg_url:
            raise BackupError(f"{backup / part['postgres']['file']}: a PostgreSQL dump of the {db.label} store, but "
                              "the workspace names no PostgreSQL database for it; set `profile: postgres` (and "
                              "database_url) in services.yaml, then restore again")
        done["postgres"] = pg_restore(backup / part["postgres"]["file"], db.pg_url, old_root, new_root, db.pg_password)
        echo(f"{db.label}: {part['postgres']['file']} restored into {done['postgres']['database']}"
             + (f"{moved}{done['postgres']['rewritten_values']} values)" if moved else ""))
    if "sqlite" in part:
        done["sqlite"] = restore_sqlite(backup / part["sqlite"]["file"], db.sqlite_file, old_root, new_root)
        echo(f"{db.label}: {db.sqlite_file} restored"
             + (f"{moved}{done['sqlite']['rewritten_values']} values)" if moved else ""))
    return done


def restore_dvc(backup: Path, manifest: dict, stores: Stores, echo: Echo) -> dict:
    """The backup's DVC objects into the cache (so every data version checks out offline) and into the
    default remote, then the work tree's data version checked out."""
    root, odb = stores.root, (Path(backup) / DVC_DIR).resolve()
    versions = [DataVersionRef(v["revision"], v["dvc_hash"], bool(v.get("legacy")))
                for v in manifest["parts"]["dvc"]["data_versions"]]
    committed = [v for v in versions if v.revision != "workspace"]
    remote = default_remote(root)
    temps = {RESTORE_REMOTE: str(odb)}
    target = None
    if remote:
        target, extra = _remote_for_all_commits(root, remote, TARGET_REMOTE)
        temps.update(extra)
    with temporary_remotes(root, temps):
        _fetch_into_cache(root, odb, committed, manifest["parts"]["dvc"]["objects"], echo)
        if target:
            _push_to_default(root, remote, target, committed, echo)
    for ref in versions:
        if ref.revision == "workspace":  # no commit names it: DVC's --all-commits would never fetch it
            _copy_objects(odb, _cache_dir(root), ref)
            echo(f"dvc: the uncommitted data version {ref.dvc_hash} is in the cache; it comes back with the "
                 "backup's uncommitted.patch (`git apply --binary`, then `dvc checkout`)")
    return {"data_versions": len(versions), "checked_out": _checkout_data(root, stores.raw_dvc_file, echo)}


def _fetch_into_cache(root: Path, odb: Path, versions: list[DataVersionRef], objects: int, echo: Echo) -> None:
    echo(f"dvc: {objects} objects into the cache")
    fetched = _dvc_quiet(root, "fetch", "-q", "--all-commits", "-r", RESTORE_REMOTE)
    missing = missing_objects(_cache_dir(root), versions)
    if missing:
        raise BackupError(_missing_message(missing, f"not fetched from {odb} into the DVC cache")
                          + "; check that the workspace's git history holds the backup's commits"
                          + _dvc_said([fetched]))


def _push_to_default(root: Path, remote: tuple[str, str], target: str, versions: list[DataVersionRef],
                     echo: Echo) -> None:
    """Every commit's objects to the default remote: checked object by object when it is a local folder;
    a remote elsewhere that cannot be reached is only warned about (the cache holds everything)."""
    name, url = remote
    echo(f"dvc: pushing them to the default remote {name} ({url})")
    pushed = _dvc_quiet(root, "push", "-q", "--all-commits", "-r", target)
    if _is_local(url):
        missing = missing_objects(_local_path(url), versions)
        if missing:
            raise BackupError(_missing_message(missing, f"`dvc push` to {url} left them out")
                              + f"; the cache has them: run `dvc push --all-commits` in {root}" + _dvc_said([pushed]))
    elif pushed.returncode != 0:
        echo(f"WARNING: dvc push to {url} failed{_dvc_said([pushed])}; the cache holds every version: run "
             "`dvc push --all-commits` when the remote can be reached")


def _copy_objects(src_odb: Path, dst_odb: Path, ref: DataVersionRef) -> None:
    """One version's objects, copied in DVC's layout (which a remote and a cache share)."""
    head = _object_path(src_odb, ref.dvc_hash, ref.legacy)
    if not head.is_file():
        return
    names = [ref.dvc_hash] + ([e["md5"] for e in json.loads(head.read_text())] if ref.dvc_hash.endswith(".dir")
                              else [])
    for md5 in names:
        src, dst = _object_path(src_odb, md5, ref.legacy), _object_path(dst_odb, md5, ref.legacy)
        if src.is_file() and not dst.is_file():
            _copy_atomic(src, dst)


def _checkout_data(root: Path, dvc_file: Path, echo: Echo) -> str | None:
    """The work tree's data version on disk (``nerveseg data checkout`` refuses to move from a missing one)."""
    if not dvc_file.is_file():
        return None
    rel = dvc_file.relative_to(root).as_posix()
    versioning.dvc(root, "checkout", "-q", "--force", rel)
    echo(f"dvc: {rel} checked out")
    return rel
