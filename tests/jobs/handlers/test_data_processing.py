"""The data_processing handler: every statistic, exactly rounded, within a million values, and
the payloads it refuses."""

from __future__ import annotations

import json
import math
import statistics
import time
from typing import Any

import pytest
from pydantic import ValidationError

from jobs.handlers import PermanentError
from tests.support.handlers import error_messages, run_sync, validate

ALL_OPERATIONS = ["count", "sum", "mean", "min", "max", "median", "stddev"]


def test_data_processing_computes_every_operation() -> None:
    result = run_sync("data_processing", {"values": [4, 1, 3, 2], "operations": ALL_OPERATIONS})
    assert result == {
        "count": 4,
        "sum": 10.0,
        "mean": 2.5,
        "min": 1.0,
        "max": 4.0,
        "median": 2.5,
        "stddev": pytest.approx(math.sqrt(1.25)),
    }
    assert list(result) == ALL_OPERATIONS
    json.dumps(result)


def test_data_processing_returns_only_requested_operations_in_order() -> None:
    result = run_sync("data_processing", {"values": [1.5, -2, 7], "operations": ["max", "count"]})
    assert list(result.items()) == [("max", 7.0), ("count", 3)]


def test_data_processing_stddev_is_the_population_one() -> None:
    values = [2, 4, 4, 4, 5, 5, 7, 9]
    result = run_sync("data_processing", {"values": values, "operations": ["stddev"]})
    assert result["stddev"] == 2.0  # the sample stddev would be about 2.138
    assert statistics.stdev(values) != 2.0


def test_data_processing_single_value() -> None:
    result = run_sync("data_processing", {"values": [3], "operations": ALL_OPERATIONS})
    assert result == {
        "count": 1,
        "sum": 3.0,
        "mean": 3.0,
        "min": 3.0,
        "max": 3.0,
        "median": 3.0,
        "stddev": 0.0,
    }


def test_data_processing_sum_and_mean_are_exactly_rounded() -> None:
    result = run_sync("data_processing", {"values": [0.1] * 10, "operations": ["sum", "mean"]})
    assert result == {"sum": 1.0, "mean": 0.1}  # the naive sum gives 0.9999999999999999
    result = run_sync("data_processing", {"values": [1e100, 1.0, -1e100], "operations": ["sum"]})
    assert result == {"sum": 1.0}


def test_data_processing_mean_and_median_of_huge_values_stay_finite() -> None:
    payload = {"values": [1e308, 1e308], "operations": ["mean", "median", "max"]}
    assert run_sync("data_processing", payload) == {"mean": 1e308, "median": 1e308, "max": 1e308}


def test_data_processing_overflowing_sum_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError, match="sum is too large"):
        run_sync("data_processing", {"values": [1e308, 1e308], "operations": ["sum"]})


def test_data_processing_handles_a_million_values() -> None:
    values = [float(i % 1000) for i in range(1_000_000)]
    started = time.monotonic()
    result = run_sync("data_processing", {"values": values, "operations": ALL_OPERATIONS})
    assert result["count"] == 1_000_000
    assert result["sum"] == 499_500_000.0
    assert result["median"] == 499.5
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"values": [], "operations": ["sum"]}, "at least 1 item"),
        ({"values": [1], "operations": []}, "at least 1 item"),
        ({"values": [1, True], "operations": ["sum"]}, "valid number"),
        ({"values": [1, "2"], "operations": ["sum"]}, "valid number"),
        ({"values": [1, None], "operations": ["sum"]}, "valid number"),
        ({"values": [float("nan")], "operations": ["sum"]}, "finite number"),
        ({"values": [float("inf")], "operations": ["sum"]}, "finite number"),
        ({"values": [10**400], "operations": ["sum"]}, "valid number"),
        ({"values": 5, "operations": ["sum"]}, "valid list"),
        ({"values": [1], "operations": ["sum", "sum"]}, "must not repeat"),
        ({"values": [1], "operations": ["mode"]}, "'count', 'sum'"),
        ({"values": [1], "operations": "sum"}, "valid list"),
        ({"values": [1], "operations": ["sum"], "extra": True}, "Extra inputs"),
        ({"operations": ["sum"]}, "Field required"),
    ],
)
def test_data_processing_rejects_bad_payloads(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate("data_processing", payload)
    assert message in error_messages(info.value)


def test_data_processing_rejects_more_than_a_million_values() -> None:
    with pytest.raises(ValidationError, match="at most 1000000 items"):
        validate("data_processing", {"values": [0] * 1_000_001, "operations": ["count"]})
