"""Failure notices of the real flow: a run that fails on a blocking data defect leaves a Prefect
artifact, a log line, and a JSON notice POSTed to a webhook on loopback (retried on a 5xx), and the
run's own error is what the caller still sees, also when the webhook is unreachable."""

from __future__ import annotations

import json
import socket
import time

import pytest
import yaml

from tests.conftest import TINY_SETTINGS, deep_update, make_project, write_settings
from tests.webhook import Hook

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def broken_project(tmp_path_factory, prefect_server):
    """A tiny project whose current data version has an unreadable frame (a blocking defect)."""
    from pipeline import versioning
    from pipeline.phantom import plant_defects

    root = make_project(tmp_path_factory.mktemp("notices") / "project")
    planted = plant_defects(root / "data" / "raw", ["unreadable_frame"], seed=3)
    versioning.version_data(root, root / "data" / "raw", "data: an unreadable frame")
    return root, planted[0]["frame_id"]


def _logs(flow_run_id, needle: str, limit: float = 20.0) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + limit
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        found = [log.message for log in logs if needle in log.message]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_failed_run_posts_its_notice_with_link_task_error_and_data_version(broken_project, monkeypatch, tmp_path):
    from flows.retrain import retrain
    from pipeline import versioning
    from pipeline.validation import DataValidationError

    monkeypatch.delenv("NERVESEG_WEBHOOK_URL", raising=False)
    with Hook(fail_first=1) as hook:
        root, frame_id = broken_project
        # the webhook as a credential file only its owner can read, never in params.yaml
        secret_file = tmp_path / "webhook"
        secret_file.write_text(hook.url + "\n")
        secret_file.chmod(0o600)
        monkeypatch.setenv("NERVESEG_WEBHOOK_URL_FILE", str(secret_file))
        write_settings(root, deep_update(TINY_SETTINGS, {"notify": {"timeout_s": 2}}))
        with pytest.raises(DataValidationError):
            retrain(project_dir=str(root))
    assert hook.attempts == 2 and len(hook.posts) == 1  # the first try got a 500 and was retried
    post = hook.posts[0]
    notice = post["json"]
    assert post["path"] == "/hooks/nerveseg" and post["type"] == "application/json"
    data = versioning.read_dvc_file(root / "data" / "raw.dvc")
    assert notice["failed_task"] == "validate"
    assert frame_id in notice["error"] and "DataValidationError" in notice["error"]
    assert notice["data_version"]["dvc_hash"] == data["md5"]
    # the commit that made this data version (the broken frame's), not just any revision
    made = versioning.git(root, "log", "-n1", "--format=%H %s", "--", "data/raw.dvc").stdout.split(maxsplit=1)
    assert made[1].strip() == "data: an unreadable frame"
    assert notice["data_version"]["git_revision"] == made[0]
    assert notice["flow"] == "retrain" and notice["state"] == "Failed"
    run_id = notice["flow_run_id"]
    assert notice["url"].endswith(f"/runs/flow-run/{run_id}") and notice["url"].startswith("http://127.0.0.1:")
    assert notice["url"] in notice["text"] and data["md5"] in notice["text"] and "in task validate" in notice["text"]

    from prefect import get_client

    with get_client(sync_client=True) as client:
        notices = [a for a in client.read_artifacts() if a.key == "failure-notice" and str(a.flow_run_id) == run_id]
    assert len(notices) == 1
    assert "failed task | validate" in notices[0].data and data["md5"] in notices[0].data
    assert _logs(run_id, "FAILURE NOTICE"), "the notice is not in the run's log"
    token = "/hooks/nerveseg"  # the webhook's path: where chat tools keep the token
    assert _logs(run_id, "posted to the webhook") and not _logs(run_id, token, limit=0)
    assert token not in notices[0].data and token not in json.dumps(notice)


def test_a_webhook_in_params_yaml_or_a_readable_credential_file_is_refused(tmp_path, monkeypatch):
    from flows.notices import webhook_url
    from pipeline.config import ParamsError, load_params
    from pipeline.credentials import CredentialError

    settings = tmp_path / "params.yaml"
    settings.write_text(yaml.safe_dump({"notify": {"webhook_url": "https://chat.example.org/hooks/T0K3N"}}))
    with pytest.raises(ParamsError, match="NERVESEG_WEBHOOK_URL"):
        load_params(settings)
    settings.write_text(yaml.safe_dump({"notify": {"webhook_url": "", "timeout_s": 3}}))  # older files: harmless
    assert load_params(settings).notify.timeout_s == 3
    shared = tmp_path / "webhook"
    shared.write_text("https://chat.example.org/hooks/T0K3N")
    shared.chmod(0o644)
    monkeypatch.delenv("NERVESEG_WEBHOOK_URL", raising=False)
    monkeypatch.setenv("NERVESEG_WEBHOOK_URL_FILE", str(shared))
    with pytest.raises(CredentialError, match="chmod 600"):
        webhook_url()
    shared.chmod(0o600)
    assert webhook_url() == "https://chat.example.org/hooks/T0K3N"


def test_unreachable_webhook_never_masks_the_error(broken_project, monkeypatch):
    from flows.retrain import retrain
    from pipeline.validation import DataValidationError

    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/gone"
    monkeypatch.setenv("NERVESEG_WEBHOOK_URL", dead)
    root, frame_id = broken_project
    write_settings(root, deep_update(TINY_SETTINGS, {"notify": {"timeout_s": 1}}))
    began = time.monotonic()
    with pytest.raises(DataValidationError, match=frame_id):  # the run's own error, naming the bad frame
        retrain(project_dir=str(root))
    assert time.monotonic() - began < 120


def test_notice_without_ui_url_names_the_run_id():
    from types import SimpleNamespace

    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from flows.notices import run_link, to_markdown

    with temporary_settings(updates={PREFECT_UI_URL: "http://ui.example:4200/"}):
        assert run_link("abc") == "http://ui.example:4200/runs/flow-run/abc"
    with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_UI_URL}):
        assert run_link("abc") is None
    notice = {"flow_run_name": "brave-otter", "flow_run_id": "abc", "url": None, "state": "Failed",
              "failed_task": None, "data_version": {}, "time": "t", "error": "boom"}
    text = to_markdown(SimpleNamespace(**notice).__dict__)
    assert "flow run id `abc`" in text and "outside any task" in text
