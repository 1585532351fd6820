"""alignpipe.secrets: which env vars count as credentials, and masking them in text and URIs."""

import pytest

from alignpipe import ray_runner
from alignpipe.secrets import MASK, is_secret_name, redact, redact_uri, secret_values


@pytest.mark.parametrize("name", ["HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                  "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "WANDB_API_KEY", "OPENAI_API_KEY",
                                  "MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN", "github_token", "DB_PASSWD"])
def test_credential_names_count(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE", "HF_TOKEN_PATH", "SSH_AUTH_SOCK",
                                  "MLFLOW_TRACKING_USERNAME", "AWS_ACCESS_KEY_ID", "HOME", "PWD", "PATH"])
def test_settings_and_locations_do_not(name):
    assert not is_secret_name(name)


def test_redact_masks_secret_values_but_not_short_flags():
    env = {"HF_TOKEN": "hf_abcdefgh123", "OPENAI_API_KEY": "sk-zzzzzzzz", "RAY_AUTH_MODE": "token",
           "DATABRICKS_TOKEN": "1", "USER": "hf_abcdefgh123x"}
    assert secret_values(env) == ["hf_abcdefgh123", "sk-zzzzzzzz"]
    text = "hub hf_abcdefgh123 key sk-zzzzzzzz mode token flag 1"
    assert redact(text, env) == f"hub {MASK} key {MASK} mode token flag 1"


def test_redact_masks_passwords_inside_uris_in_any_text():
    text = "store http://alice:pw0rd@mlflow:5000/api and s3://bucket/x and https://bob@host/"
    assert redact(text, {}) == f"store http://alice:{MASK}@mlflow:5000/api and s3://bucket/x and https://bob@host/"


def test_redact_uri_keeps_everything_but_the_password():
    assert redact_uri("http://alice:pw0rd@127.0.0.1:5000/path?x=1") == f"http://alice:{MASK}@127.0.0.1:5000/path?x=1"
    assert redact_uri("https://host/api?access_token=abc&page=2") == f"https://host/api?access_token={MASK}&page=2"
    for plain in ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000", "databricks", "file:///tmp/mlruns"):
        assert redact_uri(plain) == plain


def test_ray_workers_get_no_credentials_through_the_runtime_env():
    # runtime_env env_vars are stored by the cluster and shown in its dashboard and job records.
    assert not [k for k in ray_runner.WORKER_ENV if is_secret_name(k)]


def test_secret_values_reads_the_environment_while_another_thread_changes_it(monkeypatch):
    """MLflow's telemetry thread deletes a variable of its own at any time; redaction (on every log line) must not
    raise while it does: `os.environ.items()` raised KeyError in a bench run."""
    import os
    import threading

    monkeypatch.setenv("HF_TOKEN", "hf_planted_secret_value")
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            for i in range(50):
                os.environ[f"_ALIGNPIPE_CHURN_{i}"] = "x"
            for i in range(50):
                os.environ.pop(f"_ALIGNPIPE_CHURN_{i}", None)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            assert "hf_planted_secret_value" in secret_values()
    finally:
        stop.set()
        thread.join()
