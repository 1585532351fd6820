"""Keep credentials out of what a run writes down: which env vars hold secrets, and redaction of text and URIs.

The real values stay where they are used (the environment MLflow, Prefect and the hub read; the tracking URI
handed to `MlflowClient`). Only what gets recorded (params, tags, the run summary, the model card, printed
lines) passes through `redact`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit

MASK = "***"
# An env var whose name holds one of these holds a credential (HF_TOKEN, AWS_SECRET_ACCESS_KEY, OPENAI_API_KEY,
# MLFLOW_TRACKING_PASSWORD, PREFECT_API_AUTH_STRING, DATABRICKS_TOKEN, ...).
SECRET_PARTS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "API_KEY", "APIKEY", "AUTH", "CREDENTIAL", "PRIVATE_KEY")
# Names that match but hold settings, not secrets: masking their values ("false", "token") would garble text.
NOT_SECRET = {"TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "SSH_AUTH_SOCK"}
NOT_SECRET_SUFFIXES = ("_PATH", "_FILE", "_DIR", "_SOCK", "_MODE")  # where a secret lives, not the secret
MIN_LENGTH = 6  # shorter values ("1", "true") are flags, and masking them everywhere would eat ordinary words
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*):(?P<password>[^@/?#\s]+)@")


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential."""
    upper = name.upper()
    if upper in NOT_SECRET or upper.endswith(NOT_SECRET_SUFFIXES):
        return False
    return any(part in upper for part in SECRET_PARTS)


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values of the secret-named variables in `env` (default: this process's environment), longest first.

    Read at the moment of redaction, not once at start-up: the secrets live only in the environment, and
    whatever we redact must be checked against the same values the libraries are using now.
    """
    items = _environ_items() if env is None else env.items()
    values = {v for k, v in items if is_secret_name(k) and len(v) >= MIN_LENGTH}
    return sorted(values, key=len, reverse=True)


def _environ_items() -> list[tuple[str, str]]:
    """os.environ's items, read while other threads may set or delete variables: MLflow's telemetry thread pops
    `_MLFLOW_TELEMETRY_SESSION_ID`, and `os.environ.items()` then raised KeyError mid-iteration (a bench run)."""
    for attempt in range(10):
        try:
            keys = list(os.environ)
            break
        except RuntimeError:  # the dict changed size while its keys were read: read them again
            if attempt == 9:
                raise
    return [(k, v) for k in keys if (v := os.environ.get(k)) is not None]  # .get: a key deleted since reads None


def redact_uri(uri: str) -> str:
    """`uri` with the password of its user info and secret-named query values masked; the rest left as is.

    `http://alice:pw@host:5000/x?token=abc&a=1` -> `http://alice:***@host:5000/x?token=***&a=1`.
    """
    try:
        query = urlsplit(uri).query
    except ValueError:  # not a URI at all: fall back to the text rules
        return redact(uri)
    # Edit the string in place: a split-and-join round trip rewrites some URIs (`sqlite:////abs` loses slashes).
    uri = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", uri, count=1)
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(is_secret_name(k) for k, _ in pairs):
        masked = urlencode([(k, MASK if is_secret_name(k) else v) for k, v in pairs], safe="*")
        uri = uri.replace(f"?{query}", f"?{masked}", 1)
    return uri


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` with every secret env value and every password inside a URI replaced by `***`.

    Args:
        text: Anything about to be logged, tagged, printed or written next to a run.
        env: The environment whose secrets to mask (default: this process's).
    """
    for value in secret_values(env):
        if value in text:
            text = text.replace(value, MASK)
    return _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
