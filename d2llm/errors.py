"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback.

Messages quote the offending value through ``clip``, so a 200 000-character text in a bad row
shows as its first 200 characters and its length, not as a screenful.
"""

QUOTE_LIMIT = 200


def clip(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` for an error message: whole when short, else its first ``limit`` characters and its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} chars)"


class D2LLMError(Exception):
    """Base of every error d2llm raises on purpose (bad data, bad config, missing artefacts)."""


class ConfigError(D2LLMError, ValueError):
    """params.yaml is missing, malformed, or holds an unknown key or a bad value."""


class DataError(D2LLMError):
    """A raw or prepared dataset cannot be read or parsed."""


class DataValidationError(D2LLMError):
    """A prepared table failed a Great Expectations expectation."""


class ModelError(D2LLMError):
    """A model cannot be loaded or used as configured (e.g. a yes/no word is not one token)."""


class ArtifactError(D2LLMError):
    """An artefact (labels, checkpoint, index) is missing, stale or inconsistent."""


class PipelineLockedError(D2LLMError):
    """Another process holds a lock this one needs (d2llm.lock): the working copy's pipeline
    lock, or an index folder another ``d2llm index`` is writing."""
