"""DVC and git on a real repository in a temporary folder."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from pipeline import versioning
from tests.conftest import make_project, write_simple_dataset


def pushed_files(remote: Path, dvc_hash: str) -> dict[str, str]:
    """The files of the data version ``dvc_hash`` as the DVC remote holds them: {relpath: md5 of the bytes
    stored there}. Fails when the remote lacks the version's listing or any of its files."""
    objects = remote / "files" / "md5"
    listing = objects / dvc_hash[:2] / dvc_hash[2:]
    assert listing.is_file(), f"the remote has no listing {dvc_hash}"
    stored = {}
    for entry in json.loads(listing.read_text()):
        blob = objects / entry["md5"][:2] / entry["md5"][2:]
        assert blob.is_file(), f"{entry['relpath']} is not in the remote"
        stored[entry["relpath"]] = hashlib.md5(blob.read_bytes()).hexdigest()
    return stored


def local_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def repo(tmp_path):
    root = make_project(tmp_path / "project", with_data=False)
    write_simple_dataset(root / "data" / "raw", subjects=3, frames=2)
    return root


def test_versioned_data_has_the_hash_dvc_reports_and_is_pushed(repo):
    version = versioning.version_data(repo, repo / "data" / "raw", "data: three subjects")
    recorded = yaml.safe_load((repo / "data" / "raw.dvc").read_text())["outs"][0]
    assert version.dvc_hash == recorded["md5"] and version.dvc_hash.endswith(".dir")
    assert version.n_files == 12
    assert version.committed
    last = versioning.git(repo, "log", "-n1", "--format=%H", "--", "data/raw.dvc").stdout.strip()
    assert version.git_revision == last
    assert "data: three subjects" in versioning.git(repo, "log", "-n1", "--format=%s").stdout
    # pushed: the remote holds this version's listing and every file of it, byte for byte
    assert pushed_files(repo / "dvc-remote", version.dvc_hash) == local_files(repo / "data" / "raw")


def test_changed_data_is_refused_until_versioned(repo):
    versioning.version_data(repo, repo / "data" / "raw", "data: v1")
    (repo / "data" / "raw" / "train" / "1_1.tif").write_bytes(b"changed")
    with pytest.raises(versioning.DataVersionError, match="differs from data/raw.dvc"):
        versioning.current_data_version(repo, repo / "data" / "raw")


def test_unversioned_data_is_a_clear_error(repo):
    with pytest.raises(versioning.DataVersionError, match="not versioned"):
        versioning.current_data_version(repo, repo / "data" / "raw")


def test_a_second_version_gets_a_new_hash_and_revision(repo):
    first = versioning.version_data(repo, repo / "data" / "raw", "data: v1")
    write_simple_dataset(repo / "data" / "raw", subjects=4, frames=2, seed=1)
    second = versioning.version_data(repo, repo / "data" / "raw", "data: v2")
    assert second.dvc_hash != first.dvc_hash and second.git_revision != first.git_revision
    assert second.dvc_hash == versioning.read_dvc_file(repo / "data" / "raw.dvc")["md5"] and second.n_files == 16
    assert second.git_revision == versioning.git(repo, "rev-parse", "HEAD").stdout.strip()
    # The first version stays what it was: its commit names its hash, and the remote still holds its files.
    then = yaml.safe_load(versioning.git(repo, "show", f"{first.git_revision}:data/raw.dvc").stdout)
    assert then["outs"][0]["md5"] == first.dvc_hash
    assert len(pushed_files(repo / "dvc-remote", first.dvc_hash)) == 12
    assert pushed_files(repo / "dvc-remote", second.dvc_hash) == local_files(repo / "data" / "raw")
