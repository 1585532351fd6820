"""The live stage view follows the flow's own log lines and renders each stage's state."""

import logging

from rich.console import Console

from alignpipe.cli.progress import StageProgress


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
