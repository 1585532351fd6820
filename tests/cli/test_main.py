"""The CLI: `check` reports every pipeline; user errors print one clear message and exit non-zero."""

import os
import subprocess
import sys
import textwrap

from alignpipe.cli.main import app
from testlib import PIPELINES, REPO
from typer.testing import CliRunner

runner = CliRunner()


def test_check_lists_shipped_pipelines():
    result = runner.invoke(app, ["check", "--config", str(PIPELINES)])
    assert result.exit_code == 0, result.output
    assert "demo" in result.output and "smoke" in result.output and "invalid" not in result.output


def test_check_fails_on_a_bad_pipeline(tmp_path):
    p = tmp_path / "pipelines.yaml"
    p.write_text(textwrap.dedent("""
        pipelines:
          good:
            data: {sft: {path: a.jsonl}, eval: {path: a.jsonl}}
          bad:
            data: {sft: {path: a.jsonl}, eval: {path: a.jsonl}}
            sft: {epochz: 2}
    """))
    (tmp_path / "a.jsonl").write_text("{}\n")
    result = runner.invoke(app, ["check", "--config", str(p)], terminal_width=200)
    assert result.exit_code == 1
    assert "epochz" in result.output and "epochs" in result.output


def test_run_with_bad_config_exits_nonzero_without_traceback(tmp_path):
    env = {**os.environ, "PREFECT_API_URL": ""}
    proc = subprocess.run([sys.executable, "-m", "alignpipe.cli.main", "run", "smoke", "--config", str(PIPELINES),
                           "--set", "sft.batch_size=many"], check=False, capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 1
    assert "sft.batch_size" in proc.stderr and "many" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_every_command_turns_library_telemetry_off_first(monkeypatch):
    """Prefect's temporary server sends its own heartbeat unless told not to (DO_NOT_TRACK is not enough)."""
    for key in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.delenv(key, raising=False)
    result = runner.invoke(app, ["check", "--config", str(PIPELINES)])
    assert result.exit_code == 0, result.output
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["DO_NOT_TRACK"] == "1" and os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


def test_sigterm_ends_run_through_the_exit_handlers(monkeypatch, tmp_path):
    """Then the temporary Prefect server `run` started stops with it (the default action would leave it running)."""
    import signal

    from alignpipe import lognoise
    from alignpipe.flows import pipeline

    for key in lognoise.QUIET_ENV:  # `run` sets them in this process: gone again after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    quiet = []

    def flow_that_gets_sigterm(**kwargs):
        quiet.append(lognoise.quiet_console())  # without --verbose, the flow and its Ray workers run quiet
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not end the run")

    monkeypatch.setattr(pipeline, "alignpipe_pipeline", flow_that_gets_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    try:
        result = runner.invoke(app, ["run", "smoke", "--config", str(PIPELINES), "--set", f"workdir={tmp_path}"])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert quiet == [True]
