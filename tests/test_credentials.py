"""Credentials: read from the environment or an owner-only file, and redacted from what the project
logs or shows (pipeline/credentials.py). The real servers are in tests/test_shared_deployment.py."""

from __future__ import annotations

import logging

import pytest

from pipeline.credentials import (CredentialError, install_log_redaction, load_secret_files, read_secret_file,
                                  redact, redact_url, secret, strip_password)


def test_a_credential_file_must_be_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "db"
    path.write_text("postgresql://ops:s3cr3t-pw@db.internal:5432\n")
    path.chmod(0o640)
    with pytest.raises(CredentialError, match=r"mode 640.*chmod 600"):
        read_secret_file(path, "NERVESEG_DATABASE_URL")
    path.chmod(0o600)
    assert read_secret_file(path) == "postgresql://ops:s3cr3t-pw@db.internal:5432"
    with pytest.raises(CredentialError, match="cannot be read"):
        read_secret_file(tmp_path / "missing", "PGPASSWORD")


def test_files_fill_the_plain_variables_and_never_override_them(tmp_path):
    auth = tmp_path / "auth"
    auth.write_text("ops:pf-pass-1234\n")
    auth.chmod(0o600)
    environ = {"PREFECT_API_AUTH_STRING_FILE": str(auth), "PGPASSWORD": "given", "PGPASSWORD_FILE": str(auth)}
    assert load_secret_files(environ) == ["PREFECT_API_AUTH_STRING"]
    assert environ["PREFECT_API_AUTH_STRING"] == "ops:pf-pass-1234" and environ["PGPASSWORD"] == "given"
    assert secret("PREFECT_API_AUTH_STRING", environ) == "ops:pf-pass-1234" and secret("NOTHING", environ) == ""


def test_redaction_covers_url_passwords_webhook_tokens_and_known_values():
    environ = {"NERVESEG_WEBHOOK_URL": "https://chat.example.org/hooks/T0K3N-abcdef",
               "PREFECT_API_AUTH_STRING": "ops:pf-pass-1234", "MLFLOW_TRACKING_PASSWORD": "mlf-pass-99",
               "MLFLOW_TRACKING_USERNAME": "ops"}
    text = ("connect postgresql+psycopg2://ops:p%40ss-word@db:5432/x failed; posted to "
            "https://chat.example.org/hooks/T0K3N-abcdef; auth pf-pass-1234; login mlf-pass-99 as ops")
    out = redact(text, environ)
    for leaked in ("p%40ss-word", "T0K3N-abcdef", "pf-pass-1234", "mlf-pass-99"):
        assert leaked not in out
    assert "postgresql+psycopg2://ops:***@db:5432/x" in out and "as ops" in out  # the user name stays
    assert redact_url("https://chat.example.org/hooks/T0K3N") == "https://chat.example.org/***"
    assert redact_url("postgresql://ops:pw@db:5432") == "postgresql://ops:***@db:5432"
    assert strip_password("postgresql://ops:p%40ss@db:5432") == ("postgresql://ops@db:5432", "p@ss")


def test_every_log_record_of_the_process_is_redacted(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlf-pass-99")
    install_log_redaction()
    factory = logging.getLogRecordFactory()
    install_log_redaction()  # idempotent: a second call does not wrap the factory again
    assert logging.getLogRecordFactory() is factory
    logger = logging.getLogger("some.library")
    with caplog.at_level(logging.INFO):
        logger.info("login with %s", "mlf-pass-99")
        try:
            raise RuntimeError("refused: mlf-pass-99")
        except RuntimeError:
            logger.exception("failed")
    text = caplog.text
    assert "mlf-pass-99" not in text and "login with ***" in text and "refused: ***" in text
