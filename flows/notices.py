"""Failure notices: a failed (or crashed) retraining run says so where people look; so does a run that
ends with no champion at all (:func:`notify_no_champion`: the gate refused the model's first version).

:func:`notify_failure` is the flow's ``on_failure``/``on_crashed`` hook. It gathers the failed task,
the error, the data version and a link to the run in the Prefect UI, and leaves them

- as a Prefect markdown artifact (key ``failure-notice``) on the run,
- in the run's log (error level),
- POSTed as JSON to a webhook: ``NERVESEG_WEBHOOK_URL``, or the file ``NERVESEG_WEBHOOK_URL_FILE``
  names (a credential: chat webhooks carry their token in the URL; a ``text`` field makes the notice
  readable by chat tools' incoming webhooks). Credentials are redacted from every notice.

It never raises and every network call has a timeout: a notice that cannot be delivered is logged,
and the run's own error is what the caller sees.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.credentials import redact

WEBHOOK_ENV = "NERVESEG_WEBHOOK_URL"
ARTIFACT_KEY = "failure-notice"
ATTEMPTS = 3
MAX_ERROR_CHARS = 4000

_fallback_logger = logging.getLogger("nerveseg.notices")


def run_link(flow_run_id: Any) -> str | None:
    """``PREFECT_UI_URL/runs/flow-run/<id>``, or None when no UI address is known."""
    try:
        from prefect.settings import PREFECT_UI_URL

        ui = PREFECT_UI_URL.value()
    except Exception:  # noqa: BLE001
        ui = None
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def _project_settings(parameters: dict) -> tuple[Path, dict]:
    """The project folder and its raw settings, read leniently (a broken params.yaml may be the failure)."""
    import yaml

    from flows.workspace_step import run_workspace

    root = run_workspace(parameters.get("project_dir") or ".")  # where the run worked, as flows/retrain.py
    try:
        raw = yaml.safe_load((root / (parameters.get("params_file") or "params.yaml")).read_text()) or {}
    except Exception:  # noqa: BLE001
        raw = {}
    return root, raw if isinstance(raw, dict) else {}


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def data_version(root: Path, raw: dict) -> dict:
    """The DVC hash of the raw-data folder's ``.dvc`` file and its git revision (no ``dvc status``)."""
    from pipeline import versioning

    raw_dir = str(_section(raw, "data").get("raw_dir") or "data/raw")
    dvc_file = root / f"{raw_dir.rstrip('/')}.dvc"
    out: dict = {"dvc_file": str(dvc_file.relative_to(root)) if dvc_file.is_relative_to(root) else str(dvc_file)}
    try:
        out["dvc_hash"] = versioning.read_dvc_file(dvc_file)["md5"]
    except Exception as exc:  # noqa: BLE001
        out["dvc_hash"] = None
        out["problem"] = str(exc)[:300]
    try:
        rev = versioning.git(root, "log", "-n", "1", "--format=%H", "--", out["dvc_file"], check=False).stdout
        out["git_revision"] = rev.strip() or None
    except Exception:  # noqa: BLE001
        out["git_revision"] = None
    return out


def failed_tasks(flow_run_id: Any) -> list[dict]:
    """The task runs of this flow run that failed or crashed, in the order they started."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    bad = [r for r in runs if r.state is not None and (r.state.is_failed() or r.state.is_crashed())]
    bad.sort(key=lambda r: r.start_time or r.expected_start_time or r.created)
    # A task run's name is the task's name and a short suffix ("validate-3f2").
    return [{"task": r.name.rsplit("-", 1)[0], "task_run": r.name,
             "task_run_id": str(r.id), "message": (r.state.message or "")[:MAX_ERROR_CHARS]} for r in bad]


def _error_text(state) -> str:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as inner:  # noqa: BLE001 (the result may be unavailable)
        exc = inner
    if isinstance(exc, BaseException):
        text = f"{type(exc).__name__}: {exc}"
    else:
        text = state.message or state.name or "unknown error"
    return text[:MAX_ERROR_CHARS]


def build_notice(flow, flow_run, state) -> dict:
    """The notice as a dict (what is posted), from the hook's arguments."""
    parameters = dict(getattr(flow_run, "parameters", None) or {})
    root, raw = _project_settings(parameters)
    try:
        tasks = failed_tasks(flow_run.id)
    except Exception as exc:  # noqa: BLE001
        tasks, task_problem = [], str(exc)[:300]
    else:
        task_problem = None
    try:
        version = data_version(root, raw)
    except Exception as exc:  # noqa: BLE001
        version = {"dvc_hash": None, "problem": str(exc)[:300]}
    link = run_link(flow_run.id)
    failed_task = tasks[0]["task"] if tasks else None
    error = redact(_error_text(state))
    where = f"task {failed_task}" if failed_task else "the flow itself (outside any task)"
    text = (f"nerveseg: flow run {flow_run.name} of {flow.name} {state.name.lower()} in {where}: "
            f"{error.splitlines()[0] if error else ''} | data {version.get('dvc_hash') or '?'} | "
            f"{link or f'flow run id {flow_run.id}'}")
    notice = {
        "event": "nerveseg.flow_run.failed",
        "flow": flow.name,
        "flow_run_id": str(flow_run.id),
        "flow_run_name": flow_run.name,
        "state": state.name,
        "url": link,
        "failed_task": failed_task,
        "failed_tasks": tasks,
        "error": error,
        "data_version": version,
        "project_dir": str(root),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "text": text,
    }
    if task_problem:
        notice["failed_tasks_problem"] = task_problem
    return notice


def to_markdown(notice: dict) -> str:
    run = f"[{notice['flow_run_name']}]({notice['url']})" if notice["url"] else \
        f"{notice['flow_run_name']} (flow run id `{notice['flow_run_id']}`; set PREFECT_UI_URL for a link)"
    data = notice["data_version"]
    lines = [
        f"## Retraining run failed: {notice['flow_run_name']}\n",
        "| | |", "|---|---|",
        f"| run | {run} |",
        f"| state | {notice['state']} |",
        f"| failed task | {notice['failed_task'] or 'the flow itself (outside any task)'} |",
        f"| data version | `{data.get('dvc_hash') or '?'}` ({data.get('dvc_file', '?')} at "
        f"{(data.get('git_revision') or 'uncommitted')[:12]}) |",
        f"| time | {notice['time']} |",
        "\n**Error**\n",
        "```", notice["error"], "```",
    ]
    return "\n".join(lines) + "\n"


def webhook_url() -> str:
    """``NERVESEG_WEBHOOK_URL``, or the content of the file ``NERVESEG_WEBHOOK_URL_FILE`` names."""
    from pipeline.credentials import secret

    return secret(WEBHOOK_ENV)


def deliver(notice: dict, timeout_s: float, logger, what: str) -> None:
    """POST ``notice`` to the webhook, if one is configured, and log the outcome; sets
    ``notice["delivered"]``. Never raises: a notice must not fail or mask the run."""
    try:
        url = webhook_url()
    except Exception as exc:  # noqa: BLE001 - an unreadable credential file: said, never raised
        logger.warning("%s not posted: %s", what, exc)
        return
    if not url:
        return
    delivered, detail = post_json(url, notice, timeout_s=min(max(timeout_s, 0.5), 60.0))
    detail = redact(detail, extra=(url,))
    notice["delivered"] = delivered
    try:
        if delivered:
            logger.info("%s posted to the webhook (%s)", what, detail)
        else:
            logger.warning("%s could not be posted to the webhook after %d attempts: %s", what, ATTEMPTS, detail)
    except Exception:  # noqa: BLE001
        pass


def post_json(url: str, payload: dict, timeout_s: float = 5.0, attempts: int = ATTEMPTS) -> tuple[bool, str]:
    """POST ``payload`` as JSON; a few attempts with a short backoff. Returns (delivered, detail)."""
    body = json.dumps(payload, default=str).encode()
    detail = ""
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "nerveseg-notice"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                if 200 <= response.status < 300:
                    return True, f"HTTP {response.status}"
                detail = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            detail = f"HTTP {exc.code}"
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                break  # the receiver refuses it; retrying will not help
        except Exception as exc:  # noqa: BLE001 (refused, timed out, bad URL)
            detail = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            time.sleep(0.5 * 2 ** (attempt - 1))
    return False, detail


def _create_artifact(flow_run_id, markdown: str) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(key=ARTIFACT_KEY, type="markdown", data=markdown,
                                              description="why this retraining run failed",
                                              flow_run_id=flow_run_id))


def notify_failure(flow, flow_run, state) -> dict | None:
    """The flow hook. Never raises; returns the notice (for tests and callers) or None."""
    try:
        from prefect.logging.loggers import flow_run_logger

        logger = flow_run_logger(flow_run=flow_run, flow=flow)
    except Exception:  # noqa: BLE001
        logger = _fallback_logger
    try:
        notice = build_notice(flow, flow_run, state)
    except Exception as exc:  # noqa: BLE001
        logger.error("failure notice could not be assembled: %s", exc)
        return None
    markdown = to_markdown(notice)
    try:
        logger.error("FAILURE NOTICE: %s", notice["text"])
    except Exception:  # noqa: BLE001
        pass
    try:
        _create_artifact(flow_run.id, markdown)
    except Exception as exc:  # noqa: BLE001
        logger.warning("failure notice: the Prefect artifact could not be written: %s", exc)
    _, raw = _project_settings(dict(getattr(flow_run, "parameters", None) or {}))
    notify = _section(raw, "notify")  # read leniently: a broken params.yaml may be the failure
    try:
        timeout_s = float(notify.get("timeout_s") or 5.0)
    except (TypeError, ValueError):
        timeout_s = 5.0
    deliver(notice, timeout_s, logger, "failure notice")
    return notice


def notify_no_champion(name: str, version: str, reason: str, timeout_s: float,
                       flow_run_id: Any = None, flow_run_name: str | None = None, logger=None) -> dict:
    """A run that finished but left ``name`` without any champion: nothing can serve ``@champion``.

    Not a failure (the gate did its job), so it comes from the flow, not from the failure hook: a
    warning in the run's log and, where a webhook is configured (``NERVESEG_WEBHOOK_URL``), a JSON POST
    with ``event: nerveseg.promotion.no_champion``. Never raises."""
    logger = logger or _fallback_logger
    link = run_link(flow_run_id) if flow_run_id else None
    reason = redact(reason)
    text = (f"nerveseg: {name} has no champion: version {version} was not promoted: {reason} | "
            f"{link or f'flow run id {flow_run_id}'}")
    notice = {"event": "nerveseg.promotion.no_champion", "model": name, "version": str(version),
              "reason": reason, "flow_run_id": str(flow_run_id) if flow_run_id else None,
              "flow_run_name": flow_run_name, "url": link,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "text": text}
    try:
        logger.warning("NO CHAMPION: %s", text)
    except Exception:  # noqa: BLE001
        pass
    deliver(notice, timeout_s, logger, "no-champion notice")
    return notice
