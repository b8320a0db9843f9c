"""The hot endpoints render jobs themselves (`job_json`); the bytes must be ninja's own."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from ninja.responses import NinjaJSONEncoder

from jobs.models import Job, JobStatus
from jobs.schemas import JobCreatedOut, JobOut, job_data, job_json


def full_job() -> Job:
    at = datetime(2026, 12, 1, 10, 11, 12, 345678, tzinfo=UTC)
    return Job(
        id=uuid.uuid4(),
        tenant_id="tenant-1",
        type="webhook",
        payload={"url": "https://example.com/é", "nested": {"n": [1, 2.5, None]}},
        status=JobStatus.FAILED,
        priority=-3,
        attempts=2,
        max_attempts=5,
        timeout_ms=1500,
        error='HTTP 500 "boom"\nsecond line',
        result={"statusCode": 500, "ok": False},
        progress=40,
        progress_message="half way",
        run_at=at,
        started_at=at,
        finished_at=at,
        created_at=at,
        updated_at=at,
    )


def ninja_rendering(schema: type[JobOut], data: dict) -> dict:
    validated = schema.model_validate(data).model_dump(by_alias=True)
    return json.loads(json.dumps(validated, cls=NinjaJSONEncoder))


def test_job_json_is_what_ninja_renders() -> None:
    job = full_job()
    assert json.loads(job_json(job)) == ninja_rendering(JobOut, job_data(job))


def test_job_json_with_job_id_is_what_ninja_renders_for_a_create() -> None:
    job = full_job()
    job.status, job.error, job.result, job.finished_at = JobStatus.PENDING, None, None, None
    expected = ninja_rendering(JobCreatedOut, {**job_data(job), "job_id": job.id})
    assert json.loads(job_json(job, with_job_id=True)) == expected
    assert expected["jobId"] == str(job.id)
    assert expected["createdAt"] == "2026-12-01T10:11:12.345Z"
