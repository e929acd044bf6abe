"""What the job record (``bench.records.store``) and the evaluation record (``bench.metrics.record``) share: the UTC
timestamp they carry, and the checks both validations make (required keys, timestamps). A leaf: imports nothing of
ours."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any


def utc_now() -> str:
    """The current time as ISO-8601 UTC with milliseconds ("2025-01-31T12:00:00.123+00:00")."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def parse_utc(value: str) -> datetime.datetime:
    """An ISO-8601 timestamp (a trailing ``Z`` is read as UTC); ``ValueError`` if it is not one."""
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def check_utc_time(value: object, where: str) -> None:
    """``ValueError`` unless ``value`` is an ISO-8601 timestamp in UTC; ``where`` names the field in the message."""
    try:
        parsed = parse_utc(str(value))
    except ValueError:
        raise ValueError(f"{where} must be an ISO-8601 timestamp, got {value!r}") from None
    if parsed.utcoffset() != datetime.timedelta(0):
        raise ValueError(f"{where} must be in UTC, got {value!r}")


def require_keys(block: Any, keys: Sequence[str], where: str) -> None:
    """``ValueError`` unless ``block`` is a JSON object holding every one of ``keys``."""
    if not isinstance(block, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(block).__name__}")
    missing = [key for key in keys if key not in block]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
