"""`data_processing` jobs: summary statistics of a list of numbers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, field_validator

from jobs.handlers.registry import JobContext, PermanentError, register

MAX_VALUES = 1_000_000

Operation = Literal["count", "sum", "mean", "min", "max", "median", "stddev"]
# Strict: no bools and no numeric strings; ints are accepted and become floats.
FiniteNumber = Annotated[float, Strict(), AllowInfNan(False)]


class DataProcessingPayload(BaseModel):
    """Payload of a `data_processing` job: 1 to 1,000,000 finite numbers and the operations."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    values: list[FiniteNumber] = Field(min_length=1, max_length=MAX_VALUES)
    operations: list[Operation] = Field(min_length=1, max_length=7)

    @field_validator("operations")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("operations must not repeat")
        return value


def _sum(values: Sequence[float]) -> float:
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf  # reported as not finite below


def _mean(values: Sequence[float]) -> float:
    try:
        return math.fsum(values) / len(values)
    except OverflowError:
        # The total overflows but the mean of finite numbers never does.
        return math.fsum(value / len(values) for value in values)


def _median(values: Sequence[float]) -> float:
    middle = statistics.median(values)
    if math.isfinite(middle):
        return middle
    # (a + b) / 2 overflowed for two huge middle values; halving first cannot.
    ordered = sorted(values)
    half = len(ordered) // 2
    return ordered[half - 1] / 2 + ordered[half] / 2


def _stddev(values: Sequence[float]) -> float:
    try:
        return statistics.pstdev(values)
    except OverflowError:
        return math.inf


OPERATIONS: dict[str, Callable[[Sequence[float]], float | int]] = {
    "count": len,
    "sum": _sum,
    "mean": _mean,
    "min": min,
    "max": max,
    "median": _median,
    "stddev": _stddev,
}


# Inputs this long report progress between operations.
PROGRESS_FROM_VALUES = 100_000


@register("data_processing", schema=DataProcessingPayload, timeout_s=60)
def process_data(payload: DataProcessingPayload, ctx: JobContext) -> dict[str, float | int]:
    """Compute each requested operation; `{operation: value}` in the order asked.

    `sum` and `mean` use `math.fsum` (exactly rounded); `stddev` is the population standard
    deviation (`statistics.pstdev`), not the sample one.
    """
    result: dict[str, float | int] = {}
    long_input = len(payload.values) >= PROGRESS_FROM_VALUES
    for done, operation in enumerate(payload.operations):
        if long_input:
            ctx.report_progress(100 * done / len(payload.operations), f"computing {operation}")
        value = OPERATIONS[operation](payload.values)
        if not math.isfinite(value):
            # JSON has no infinity, and a retry would compute the same thing.
            raise PermanentError(f"{operation} is too large to represent as a number")
        result[operation] = value
    return result
