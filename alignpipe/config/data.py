"""Where the data lives and what the `validate` stage demands of it."""

from typing import Literal

from pydantic import Field

from alignpipe.config.base import Section

SftFormat = Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt"]
PreferenceFormat = Literal["auto", "prompt_chosen_rejected", "hh_rlhf", "ultrafeedback"]


class SourceConfig(Section):
    path: str = Field(..., description="Local .jsonl/.json/.csv/.parquet file, or `hf://<dataset id>[:split]`.")
    format: SftFormat = Field("auto", description="Row format; `auto` detects it from the columns.")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows (quick experiments).")


class PreferenceSourceConfig(SourceConfig):
    format: PreferenceFormat = Field(  # type: ignore[assignment]
        "auto", description="Pair format: prompt/chosen/rejected, HH-RLHF transcripts or UltraFeedback message "
        "lists; `auto` detects it from the columns.")


class DataConfig(Section):
    sft: SourceConfig = Field(..., description="Supervised fine-tuning data.")
    eval: SourceConfig = Field(..., description="Held-out split used by `evaluate` (never trained on).")
    preference: PreferenceSourceConfig | None = Field(None, description="Preference pairs for the align stage.")
    preference_eval: PreferenceSourceConfig | None = Field(
        None, description="Held-out preference pairs: preference accuracy and reward margin in `evaluate`.")
    json_targets: bool = Field(False, description="Assistant answers must parse as JSON objects (checked and scored).")


class ValidateConfig(Section):
    max_tokens: int = Field(512, ge=8, description="Longest allowed conversation, in the model's own tokens.")
    max_duplicate_rate: float = Field(0.01, ge=0, le=1, description="Largest allowed share of duplicate rows.")
    allow_pii: bool = Field(False, description="Allow e-mail addresses, phone numbers and API-key-like strings.")
    sample_rows: int = Field(5, ge=1, le=50, description="Offending rows quoted per failed expectation.")
    batch_rows: int = Field(
        1024, ge=1, description="Rows checked (parsed, chat-templated, tokenized, hashed) at a time: the rows "
        "validate holds in memory, per process, whatever the file's size.")
    stream_threshold_mb: float = Field(
        64, ge=0, description="A .jsonl source larger than this is checked in parallel on Ray Data (in parts of the "
        "file, one Ray worker per CPU); a smaller one, or any file read with data.<split>.limit, in this process, "
        "where Ray's start-up would cost more than it saves. With compute.ray_address set, every .jsonl goes to Ray. "
        ".json, .csv, .parquet and hf:// sources are read whole in this process, then checked in batches.")
    max_line_kb: int = Field(
        1024, ge=1, description="Longest JSONL line read; a longer one is refused without reading it whole (a "
        "conversation within max_tokens is a few KB, so this catches files that are not one row per line).")
