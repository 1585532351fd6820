"""The live stage view follows the flow's own log lines and renders each stage's state and the running stage's
progress from the board; without a terminal, plain progress lines come only for long work."""

import logging
import time

from rich.console import Console

from alignpipe.cli.progress import ProgressLines, StageProgress


def _render(view) -> str:
    console = Console(width=100, record=True, force_terminal=False)
    console.print(view)
    return console.export_text()


def test_stage_view_tracks_the_flow_log():
    view = StageProgress("smoke")
    logger = logging.getLogger("test.progress")
    logger.setLevel(logging.INFO)
    logger.addHandler(view)
    try:
        assert "starting" in _render(view)
        logger.info("stage validate: running")
        logger.info("stage validate: done in 4.2s")
        logger.info("stage sft: running")
        logger.info("sft: 6 steps, train loss 1.2")  # other lines leave the view alone
        text = _render(view)
        assert "validate" in text and "done" in text and "4s" in text
        assert "sft" in text and "running" in text
        view.fail_running()
        assert list(view.stages) == ["validate", "sft"] and view.stages["sft"]["status"] == "failed"
        assert "failed" in _render(view)
    finally:
        logger.removeHandler(view)


def test_the_view_shows_the_running_stage_progress_from_the_board():
    view = StageProgress("smoke")
    view.emit(logging.makeLogRecord({"msg": "stage sft: running"}))
    view.board = {"sft": {"kind": "train", "done": 30, "total": 120, "loss": 1.23456, "tokens_per_s": 850.4,
                          "eta_s": 312.0, "at": time.time()}}
    text = _render(view)
    assert "sft: step 30/120 (25%), loss 1.235, 850 tokens/s, ETA 5m12s" in text
    view.emit(logging.makeLogRecord({"msg": "stage sft: done in 40.0s"}))
    view.emit(logging.makeLogRecord({"msg": "stage evaluate: running"}))
    assert "step 30/120" not in _render(view)  # the board's sft entry belongs to a stage that is over
    view.board["evaluate"] = {"kind": "eval", "label": "aligned", "done": 8, "total": 16, "tokens_per_s": 1500.0,
                              "eta_s": 4.0, "at": time.time()}
    assert "evaluate: aligned 8/16 rows (50%), 1500 tokens/s, ETA 4s" in _render(view)
    assert view.fail_running() == [f"stage evaluate: failed after {view.stages['evaluate']['secs']:.1f}s"]


def test_plain_progress_lines_only_for_long_work_every_30s_or_quarter():
    view = StageProgress("demo")
    view.emit(logging.makeLogRecord({"msg": "stage sft: running"}))
    lines: list[str] = []
    plain = ProgressLines(view, lines.append)

    def at(seconds: float, done: int) -> None:
        view.board = {"sft": {"kind": "train", "done": done, "total": 100, "eta_s": 60.0, "at": time.time()}}
        plain.update(now=1000.0 + seconds)

    at(0, 1)     # first report
    at(20, 40)   # short so far: nothing
    at(31, 45)   # reporting for 30 s: the first line
    at(40, 49)   # neither 30 s more nor a new quarter
    at(45, 51)   # crossed 50 %
    at(50, 60)
    at(76, 62)   # 30 s after the last line
    at(80, 100)  # done: the stage line says so
    assert [line.split(",")[0] for line in lines] == ["sft: step 45/100 (45%)", "sft: step 51/100 (51%)",
                                                      "sft: step 62/100 (62%)"]
    assert all("\x1b" not in line and "\r" not in line for line in lines)
