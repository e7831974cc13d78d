"""The quickstart's data step: phantom generated, versioned with DVC, committed and pushed, once."""

from pipeline import versioning
from tests.conftest import make_project
from tests.test_versioning import local_files, pushed_files


def test_phantom_is_generated_versioned_and_pushed_once(tmp_path):
    from flows.quickstart import ensure_versioned_phantom

    root = make_project(tmp_path / "project", with_data=False)
    messages = []
    first = ensure_versioned_phantom(root, echo=messages.append)
    assert first.committed and first.n_files == 2 * 6 * 6
    assert any("generating the phantom" in m for m in messages)
    log = versioning.git(root, "log", "--format=%s", "--", "data/raw.dvc").stdout
    assert "synthetic phantom, 36 frames of 6 subjects" in log
    assert first.dvc_hash == versioning.read_dvc_file(root / "data" / "raw.dvc")["md5"]
    assert pushed_files(root / "dvc-remote", first.dvc_hash) == local_files(root / "data" / "raw")

    head = versioning.git(root, "rev-parse", "HEAD").stdout
    again = ensure_versioned_phantom(root, echo=messages.append)
    assert again == first
    assert versioning.git(root, "rev-parse", "HEAD").stdout == head  # nothing new to commit


def test_a_fresh_clone_restores_the_data_from_the_remote(tmp_path):
    from flows.quickstart import ensure_versioned_phantom

    root = make_project(tmp_path / "project", with_data=False)
    first = ensure_versioned_phantom(root, echo=lambda m: None)
    clone = tmp_path / "clone"
    versioning.run_command(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    # the clone shares the remote folder through the relative remote URL's target: point it there
    versioning.dvc(clone, "remote", "modify", "local", "url", str(root / "dvc-remote"))
    head = versioning.git(clone, "rev-parse", "HEAD").stdout
    said = []
    restored = ensure_versioned_phantom(clone, echo=said.append)
    assert restored.dvc_hash == first.dvc_hash and restored.git_revision == first.git_revision
    # pulled from the remote, not a phantom generated again (which would look the same: it is seeded)
    assert "restoring data/raw from the DVC cache/remote" in said and not [m for m in said if "generating" in m]
    assert versioning.git(clone, "rev-parse", "HEAD").stdout == head
    assert local_files(clone / "data" / "raw") == local_files(root / "data" / "raw")
    assert len(local_files(clone / "data" / "raw")) == first.n_files
