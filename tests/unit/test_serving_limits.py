"""The served model's request checks: size limits and messages (no server, no model)."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from d2llm.serving import MAX_ROWS, MAX_TEXT_CHARS, validate_pairs, validate_queries

pytestmark = pytest.mark.filterwarnings("ignore:Add type hints to the `predict` method:UserWarning")


def _pairs(n: int, text: str = "a man plays") -> pd.DataFrame:
    return pd.DataFrame({"text_a": [text] * n, "text_b": ["a dog"] * n, "task": ["sym"] * n})


def test_requests_at_the_limits_pass() -> None:
    text_a, _, tasks = validate_pairs(_pairs(MAX_ROWS))
    assert len(text_a) == MAX_ROWS and set(tasks) == {"sym"}
    assert validate_pairs(_pairs(1, "x" * MAX_TEXT_CHARS))[0] == ["x" * MAX_TEXT_CHARS]
    queries, ks = validate_queries(pd.DataFrame({"query": ["water"] * MAX_ROWS}), default_k=5)
    assert len(queries) == MAX_ROWS and set(ks) == {5}


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (_pairs(MAX_ROWS + 1), f"request has {MAX_ROWS + 1} rows; the limit is {MAX_ROWS} rows per request"),
        (_pairs(0), "request has no rows"),
        (
            _pairs(2, "y" * (MAX_TEXT_CHARS + 1)),
            f"column 'text_a' row 0: text has {MAX_TEXT_CHARS + 1} characters; the limit is {MAX_TEXT_CHARS}",
        ),
    ],
)
def test_oversized_pair_requests_get_a_message_naming_the_limit(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(MlflowException, match=message) as err:
        validate_pairs(frame)
    assert err.value.get_http_status_code() == 400


def test_oversized_search_requests_and_the_custom_limits() -> None:
    with pytest.raises(MlflowException, match="the limit is 3 rows per request"):
        validate_queries(pd.DataFrame({"query": ["water"] * 4}), default_k=5, max_rows=3)
    with pytest.raises(MlflowException, match="text has 6 characters; the limit is 5 characters per text"):
        validate_queries(pd.DataFrame({"query": ["waters"]}), default_k=5, max_chars=5)


def test_a_huge_bad_value_is_not_echoed_whole() -> None:
    frame = pd.DataFrame({"text_a": ["a"], "text_b": ["b"], "task": ["z" * 200_000]})
    with pytest.raises(MlflowException, match="is not one of") as err:
        validate_pairs(frame)
    assert len(err.value.message) < 1_000 and "(200002 chars)" in err.value.message


def test_pair_requests_take_task_kinds_and_families() -> None:
    frame = pd.DataFrame({"text_a": ["a"] * 4, "text_b": ["b"] * 4, "task": ["sym", "asym", "nli", "sts"]})
    assert validate_pairs(frame)[2] == ["sym", "asym", "nli", "sts"]
    with pytest.raises(MlflowException, match="'qa' is not one of"):
        validate_pairs(frame.assign(task=["qa"] * 4))
