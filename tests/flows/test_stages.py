"""Each stage's plain function is wrapped once as a Prefect task, with the retries that can help."""

from prefect import Task

from alignpipe.flows import stages


def test_the_flow_wraps_every_stage_as_a_prefect_task():
    for name in ("validate", "sft", "align", "quantize", "evaluate", "register"):
        task = getattr(stages, name)
        assert isinstance(task, Task) and task.name == name
    assert stages.register.retries == 2 and stages.validate.retries == 0  # bad data fails the same way every time
    assert set(stages.STAGE_MODULES) == {"validate", "sft", "align", "quantize", "evaluate"}  # register: never cached
