"""The pipeline's Prefect tasks: each a thin wrapper around a stage's plain function in `alignpipe.tasks`.

The stage modules stay free of Prefect (Ray workers import them); retries, caching and names live here, where the
flow is composed. Caching is explicit: `flows.pipeline` gives each stage a content-keyed policy built from the
stage's own `cache_key` (see `alignpipe.flows.caching`); registration is never cached.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from alignpipe.errors import AlignpipeError
from alignpipe.tasks import align as align_stage
from alignpipe.tasks import evaluate as evaluate_stage
from alignpipe.tasks import quantize as quantize_stage
from alignpipe.tasks import register as register_stage
from alignpipe.tasks import sft as sft_stage
from alignpipe.tasks import validate as validate_stage


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry tracking-server hiccups; an AlignpipeError (e.g. an unmergeable adapter) fails the same way again."""
    try:
        state.result()
    except AlignpipeError:
        return False
    except Exception:
        return True
    return False


# No retries on validate: bad data fails the same way every time.
validate = task(validate_stage.run_validate, name="validate", cache_policy=NO_CACHE,
                description="Validate the data in a nested MLflow run; bad data stops the flow.")
sft = task(sft_stage.run_sft, name="sft", cache_policy=NO_CACHE,
           description="Fine-tune the base model with a PEFT adapter on Ray Train.")
align = task(align_stage.run_align, name="align", cache_policy=NO_CACHE,
             description="Align the SFT model on preference pairs (a new adapter on the merged SFT model).")
quantize = task(quantize_stage.run_quantize, name="quantize", cache_policy=NO_CACHE,
                description="Merge the last trained adapter and quantize the result.")
evaluate = task(evaluate_stage.run_evaluate, name="evaluate", cache_policy=NO_CACHE,
                description="Score every model on the held-out split with the same decoding.")
register = task(register_stage.register_model, name="register", cache_policy=NO_CACHE, retries=2,
                retry_delay_seconds=[5, 20], retry_condition_fn=retry_unless_user_error,
                description="Register the final artifact and run the promotion gates; never cached.")

# The stage module whose `cache_key` keys each cached task.
STAGE_MODULES = {"validate": validate_stage, "sft": sft_stage, "align": align_stage, "quantize": quantize_stage,
                 "evaluate": evaluate_stage}
