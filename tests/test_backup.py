"""``nerveseg backup`` and ``nerveseg restore`` on a real workspace: two data versions, two trained
versions (one flow run in this process, one as an operator runs it, so the project's own Prefect database
holds it), a manual promotion; then the backup, the workspace deleted with every store, a fresh clone
elsewhere, the restore, and the operator's views must be what they were. Real git, DVC, MLflow, Prefect.

The operator's commands run in this process (``run_cli``: the project's folder and Prefect home, as
`nerveseg` has them), except ``nerveseg run``, which must record its flow run in the project's own Prefect
database, and the refusals, whose exit codes are checked on the real executable."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import TINY_SETTINGS, deep_update, make_project, run_cli, seed_mlflow_store, subject_batch
from tests.service_helpers import (
    POSTGRES, last_json, nerveseg, postgres_admin, postgres_reachable, temporary_databases,
)

e2e = pytest.mark.e2e
# What is trained does not matter here, only that versions exist: one epoch, one overlay and three frames a
# subject keep the two flow runs short (6 subjects keep the split's holdout; 18 frames clear validation.min_frames).
SETTINGS = deep_update(TINY_SETTINGS, {"data": {"synth": {"frames_per_subject": 3}}, "train": {"epochs": 1},
                                       "evaluate": {"overlays": 1}})

MODEL = "nerve-segmentation"
WORKSPACE = "<WORKSPACE>"


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _views(root: Path) -> dict[str, str]:
    """What an operator reads about the registry, with the workspace's path (which moved) normalised."""
    views = {"models": run_cli(root, "models", "--json").stdout,
             "audit": run_cli(root, "audit", "--json").stdout,
             "ledger": run_cli(root, "ledger", "--json").stdout}
    return {name: text.replace(str(root), WORKSPACE) for name, text in views.items()}


def _flow_runs(root: Path) -> list[tuple]:
    with sqlite3.connect(root / ".prefect" / "prefect.db") as conn:
        return sorted(conn.execute("SELECT id, name, state_type FROM flow_run").fetchall())


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory, prefect_server, mlflow_store_template):
    """A workspace with history, backed up, then deleted with its stores; a bare copy of its repository
    stands for the team's git server."""
    from flows.retrain import retrain
    from pipeline import versioning
    from pipeline.phantom import PhantomSpec, generate_phantom

    base = tmp_path_factory.mktemp("backup")
    root = make_project(base / "project", SETTINGS)
    seed_mlflow_store(root / "mlflow", mlflow_store_template)  # an empty store: MLflow's migrations done once
    first_revision = versioning.git(root, "log", "-n", "1", "--format=%H", "--", "data/raw.dvc").stdout.strip()
    first_files = _digests(root / "data" / "raw")
    first = retrain(project_dir=str(root))  # version 1, on the test session's Prefect server

    generate_phantom(base / "more", PhantomSpec(subjects=8, frames_per_subject=3, seed=7))
    run_cli(root, "data", "add", str(subject_batch(base / "more", base / "batch", (7, 8))), "--no-trigger")
    # Version 2, as an operator runs it: its flow run is recorded in the project's own .prefect/prefect.db.
    second = last_json(nerveseg(root, "run", "--json").stdout)
    other = first["version"] if second["decision"]["promote"] else second["version"]
    run_cli(root, "promote", other, "--reason", "chosen by hand before the backup", "--actor", "ops")

    before = _views(root)
    flow_runs = _flow_runs(root)
    backup_dir = base / "backup-1"
    done = run_cli(root, "backup", "--out", str(backup_dir))
    versioning.git(base, "clone", "-q", "--bare", str(root), str(base / "origin.git"))
    shutil.rmtree(root)  # the workspace, the MLflow store, the Prefect home, the DVC cache and remote
    return SimpleNamespace(base=base, old_root=root, backup=backup_dir, output=done.stdout + done.stderr,
                           before=before, flow_runs=flow_runs, first_revision=first_revision,
                           first_files=first_files, promoted=other)


@pytest.fixture(scope="module")
def restored(backed_up):
    """A fresh clone in another folder (so every absolute path in the stores is wrong until rewritten),
    restored from the backup by the operator's command."""
    from pipeline import versioning

    clone = backed_up.base / "elsewhere" / "restored"
    clone.parent.mkdir()
    versioning.git(clone.parent, "clone", "-q", str(backed_up.base / "origin.git"), str(clone))
    done = run_cli(clone, "restore", str(backed_up.backup))
    return SimpleNamespace(root=clone, output=done.stdout + done.stderr)


@e2e
def test_backup_holds_every_part_with_a_checksum(backed_up):
    manifest = json.loads((backed_up.backup / "manifest.json").read_text())
    assert manifest["format"] == "nerveseg-backup" and manifest["format_version"] == 1
    assert manifest["project"] == str(backed_up.old_root)
    parts = manifest["parts"]
    assert parts["mlflow_store"]["sqlite"]["file"] == "mlflow/mlflow.db"
    assert parts["prefect_db"]["sqlite"]["file"] == "prefect/prefect.db"
    assert parts["mlflow_artifacts"]["files"] > 0 and parts["gx"]["files"] > 0
    assert len(parts["dvc"]["data_versions"]) == 2 and parts["dvc"]["missing"] == {}
    assert parts["workspace"]["file"] == "workspace.bundle"
    written = {p.relative_to(backed_up.backup).as_posix() for p in backed_up.backup.rglob("*") if p.is_file()}
    assert written - {"manifest.json"} == set(manifest["files"])
    assert not list(backed_up.base.glob("backup-1.partial-*"))  # built aside, renamed when whole
    assert "backup written to" in backed_up.output


@e2e
def test_a_fresh_clone_restored_shows_what_the_workspace_showed(backed_up, restored):
    root = restored.root
    after = _views(root)
    for name in ("models", "ledger", "audit"):
        assert after[name] == backed_up.before[name], f"`nerveseg {name}` differs after the restore"
    assert "chosen by hand before the backup" in after["ledger"]
    assert json.loads(after["audit"])["version"] == backed_up.promoted
    # Every stored location now names the new workspace; none the deleted one.
    with sqlite3.connect(root / "mlflow" / "mlflow.db") as conn:
        dump = "\n".join(conn.iterdump())
    assert str(backed_up.old_root) not in dump and str(root) in dump
    assert _flow_runs(root) == backed_up.flow_runs and len(backed_up.flow_runs) >= 1
    assert "restored into" in restored.output


@e2e
def test_the_restored_champion_serves_and_its_card_renders(restored):
    root = restored.root
    frames = sorted(p for p in (root / "data" / "raw" / "train").glob("*.tif") if not p.stem.endswith("_mask"))[:3]
    run_cli(root, "predict", *map(str, frames), "--out", str(root / "predictions"))
    assert len(list((root / "predictions").glob("*_mask.png"))) == 3
    run_cli(root, "card", "--out", str(root / "card.html"))
    assert MODEL in (root / "card.html").read_text()


@e2e
def test_an_earlier_data_version_checks_out_with_the_same_files(backed_up, restored):
    root = restored.root
    manifest = json.loads((backed_up.backup / "manifest.json").read_text())
    for version in manifest["parts"]["dvc"]["data_versions"]:  # in the default remote too, not only the cache
        md5 = version["dvc_hash"]
        assert (root / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]).is_file()
    run_cli(root, "data", "checkout", backed_up.first_revision)
    assert _digests(root / "data" / "raw") == backed_up.first_files


@e2e
def test_backup_refuses_a_folder_that_is_not_empty(backed_up, restored):
    before = _digests(backed_up.backup)
    refused = nerveseg(restored.root, "backup", "--out", str(backed_up.backup), check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert str(backed_up.backup) in refused.stderr and "not an empty folder" in refused.stderr
    assert _digests(backed_up.backup) == before
    assert not list(backed_up.base.glob("backup-1.partial-*"))


@e2e
def test_restore_refuses_a_store_that_holds_records(backed_up, restored):
    store = restored.root / "mlflow" / "mlflow.db"
    stamp = store.stat().st_mtime_ns
    refused = nerveseg(restored.root, "restore", str(backed_up.backup), check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert str(store) in refused.stderr and "--force" in refused.stderr
    assert store.stat().st_mtime_ns == stamp


@e2e
def test_restore_refuses_a_tampered_backup(backed_up):
    tampered = backed_up.base / "tampered"
    shutil.copytree(backed_up.backup, tampered)
    store = tampered / "mlflow" / "mlflow.db"
    data = bytearray(store.read_bytes())
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(bytes(data))
    target = backed_up.base / "never-written"
    refused = nerveseg(backed_up.base, "restore", str(tampered), "--into", str(target), check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert str(store) in refused.stderr and "sha256" in refused.stderr and "nothing was restored" in refused.stderr
    assert not target.exists()


def test_a_postgres_profile_without_pg_dump_fails_before_writing(tmp_path, monkeypatch):
    from pipeline.backup import BackupError, Stores, create_backup

    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    root = tmp_path / "project"
    stores = Stores(root=root, raw_dvc_file=root / "data" / "raw.dvc", mlflow_db=root / "mlflow" / "mlflow.db",
                    mlflow_artifacts=root / "mlflow" / "artifacts", prefect_db=root / ".prefect" / "prefect.db",
                    gx_dir=root / "gx", mlflow_postgres=f"{POSTGRES}/nerveseg_mlflow")
    with pytest.raises(BackupError, match="pg_dump not found on PATH.*postgresql-client"):
        create_backup(stores, tmp_path / "backup", echo=lambda _: None, progress=False)
    assert not list(tmp_path.glob("backup*"))


@pytest.mark.skipif(not (postgres_reachable() and shutil.which("pg_dump") and shutil.which("pg_restore")),
                    reason="needs PostgreSQL on 127.0.0.1:5432 and its client tools")
def test_postgres_stores_round_trip_through_pg_dump_with_the_path_rewritten(tmp_path):
    import psycopg2

    from pipeline.backup import pg_dump, pg_holds_tables, pg_restore

    old, new = "/old/workspace", str(tmp_path / "new workspace")
    with temporary_databases("source", "target") as names:
        postgres_admin(*(f'CREATE DATABASE "{name}"' for name in names.values()))
        source, target = (f"{POSTGRES}/{names[role]}" for role in ("source", "target"))
        with psycopg2.connect(source) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE experiments (name varchar(256), artifact_location text, n integer)")
            cur.execute("INSERT INTO experiments VALUES (%s, %s, 1), (%s, %s, 2)",
                        ("nerve-segmentation", f"file://{old}/mlflow/artifacts/1", "elsewhere", f"{old}-copy/x"))
        assert not pg_holds_tables(target)
        pg_dump(source, tmp_path / "mlflow.pgdump")
        done = pg_restore(tmp_path / "mlflow.pgdump", target, old, new)
        assert pg_holds_tables(target)
        with psycopg2.connect(target) as conn, conn.cursor() as cur:
            cur.execute("SELECT name, artifact_location FROM experiments ORDER BY n")
            rows = cur.fetchall()
        conn.close()
    assert done["rewritten_values"] == 1
    new_uri = (tmp_path / "new workspace").as_uri()
    assert rows == [("nerve-segmentation", f"{new_uri}/mlflow/artifacts/1"), ("elsewhere", f"{old}-copy/x")]


def test_the_workspace_path_is_rewritten_in_every_text_value_of_a_sqlite_store(tmp_path):
    from pipeline.backup import restore_sqlite

    old, new = "/old/workspace", str(tmp_path / "new workspace")
    source = tmp_path / "mlflow.db"
    with sqlite3.connect(source) as conn:
        conn.execute("CREATE TABLE runs (run_uuid VARCHAR(32), artifact_uri VARCHAR(200), lifecycle TEXT, n INTEGER)")
        conn.execute("CREATE TABLE tags (key TEXT, value JSON)")
        conn.executemany("INSERT INTO runs VALUES (?, ?, ?, ?)", [
            ("a", f"file://{old}/mlflow/artifacts/1/a/artifacts", "active", 1),
            ("b", f"{old}-copy/mlflow/artifacts", "active", 2)])
        conn.executemany("INSERT INTO tags VALUES (?, ?)", [
            ("project_dir", old), ("params", json.dumps({"project_dir": f"{old}/params.yaml"}))])
    dest = tmp_path / "restored" / "mlflow.db"
    done = restore_sqlite(source, dest, old, new)
    with sqlite3.connect(dest) as conn:
        runs = conn.execute("SELECT artifact_uri, n FROM runs ORDER BY n").fetchall()
        tags = dict(conn.execute("SELECT key, value FROM tags").fetchall())
    new_uri = (tmp_path / "new workspace").as_uri()
    assert runs == [(f"{new_uri}/mlflow/artifacts/1/a/artifacts", 1), (f"{old}-copy/mlflow/artifacts", 2)]
    assert tags == {"project_dir": new, "params": json.dumps({"project_dir": f"{new}/params.yaml"})}
    assert done["rewritten_values"] == 3
    assert not list(dest.parent.glob(".*.tmp"))  # written under a temporary name, then renamed
