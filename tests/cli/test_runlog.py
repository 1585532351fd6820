"""The run log router: every line to the file (bars reduced to their last state, no colour codes); to the console,
in quiet mode, everything but the Ray workers' lines, of which warnings, errors and tracebacks still come through."""

import io
import logging
import sys

from alignpipe.cli.runlog import RunLog, plain, recording

BAR = "\rLoading weights:   0%|          | 0/20 [00:00<?, ?it/s]\rLoading weights: 100%|##########| 20/20 [00:00<00:00]"
WORKER = [
    f"\x1b[36m(RayTrainWorker pid=15613)\x1b[0m {BAR}\n",
    "(TrainController pid=15422) Requesting resources: {'CPU': 1.0} * 1\n",
    "(evaluate_model pid=16129, ip=10.0.0.7) /x/peft/tuners.py:12: UserWarning: target module not found\n",
    "(evaluate_model pid=16129, ip=10.0.0.7)   warnings.warn(\n",
    "(evaluate_model pid=16129, ip=10.0.0.7) Traceback (most recent call last):\n",
    '(evaluate_model pid=16129, ip=10.0.0.7)   File "x.py", line 1, in <module>\n',
    "(evaluate_model pid=16129, ip=10.0.0.7) ValueError: bad row\n",
    "(evaluate_model pid=16129, ip=10.0.0.7) Reporting training result 1\n",
    "(evaluate_model pid=16129, ip=10.0.0.7)   indented, but after a plain line again\n",
]


def _record(tmp_path, verbose: bool) -> tuple[str, str]:
    console = io.StringIO()
    log = RunLog(tmp_path / "runs" / "r" / "run.log")
    saved = sys.stderr
    sys.stderr = console
    try:
        with recording(log, verbose):
            for line in WORKER:
                for part in line.split(" ", 1):  # Ray prints a line in pieces; the router waits for its end
                    sys.stderr.write(part + (" " if not part.endswith("\n") else ""))
            print("stage sft: running", file=sys.stderr)
            logging.getLogger("prefect.flow_runs").warning("a flow warning")
    finally:
        sys.stderr = saved
        log.close()
    return console.getvalue(), log.path.read_text()


def test_quiet_console_keeps_worker_warnings_errors_and_tracebacks_the_file_keeps_all(tmp_path):
    console, file = _record(tmp_path, verbose=False)
    assert "Loading weights" not in console and "Requesting resources" not in console
    for kept in ("UserWarning", "warnings.warn(", "Traceback", 'File "x.py"', "ValueError: bad row",
                 "stage sft: running"):
        assert kept in console, kept
    assert "after a plain line again" not in console
    assert "(RayTrainWorker pid=15613) Loading weights: 100%|##########| 20/20 [00:00<00:00]\n" in file
    assert "Requesting resources" in file and "after a plain line again" in file and "stage sft: running" in file
    assert "WARNING prefect.flow_runs - a flow warning" in file
    assert "\x1b" not in file and "\r" not in file


def test_verbose_console_gets_every_line(tmp_path):
    console, _ = _record(tmp_path, verbose=True)
    assert "Loading weights" in console and "Requesting resources" in console


def test_plain_keeps_a_bar_last_state_and_other_lines_as_they_are():
    assert plain("\x1b[36m(pid=1)\x1b[0m \ra\rb\x1b[A\n") == "(pid=1) b\n"
    assert plain("loss 1.0 (pid=2) here\n") == "loss 1.0 (pid=2) here\n"
