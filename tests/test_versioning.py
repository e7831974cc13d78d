"""DVC and git on a real repository in a temporary folder."""

import pytest
import yaml

from pipeline import versioning
from tests.conftest import make_project, write_simple_dataset


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
    # pushed: the remote holds the directory listing object
    remote = repo / "dvc-remote"
    assert any(p.name.endswith(".dir") for p in remote.rglob("*"))


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
