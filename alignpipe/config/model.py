"""Which model to tune."""

from pydantic import Field

from alignpipe.config.base import Section

EMBEDDED_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"


class ModelConfig(Section):
    name: str = Field(
        EMBEDDED_MODEL,
        min_length=1,
        description=(
            f"'{EMBEDDED_MODEL}' (embedded SmolLM2-135M-Instruct, dequantized Q4_1 GGUF), "
            f"'{TINY_MODEL}' (a few-MB random model for tests), a local folder, or a Hugging Face hub id."
        ),
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `name` is a hub id.")
    system_prompt: str | None = Field(
        None,
        description="System turn added to every conversation that has none, in training, evaluation and serving.",
    )
