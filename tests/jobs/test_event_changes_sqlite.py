"""The change log on SQLite, the database `make run` uses by default: its row trigger (installed
after migrate, jobs/cursors.py) logs each change of a subscribed tenant's job as PostgreSQL's
statement triggers do, and the dispatcher reads the rows back into jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.stack import stack_env

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json
from django.utils import timezone
from jobs.events_dispatch import dispatch
from jobs.models import Job, JobChange, JobStatus
from jobs.services import (
    JobSpec, event_subscription_create, job_cancel, job_enqueue, job_retry, tenant_create,
)

tenant = tenant_create(tenant_id="acme")
quiet = tenant_create(tenant_id="globex")
event_subscription_create(tenant=tenant, url="https://example.com/hook", events=["job.*"])
job_enqueue(tenant=quiet, spec=JobSpec(type="sleep", payload={"delayMs": 1}))
job, _ = job_enqueue(tenant=tenant, spec=JobSpec(type="sleep", payload={"delayMs": 1}))
now = timezone.now()
rows = Job.objects.filter(id=job.id)
rows.update(status=JobStatus.RUNNING, attempts=1, started_at=now, updated_at=now)
rows.update(status=JobStatus.COMPLETED, result={"sleptMs": 1}, finished_at=now)
other, _ = job_enqueue(tenant=tenant, spec=JobSpec(type="sleep", payload={"delayMs": 1}))
job_cancel(tenant=tenant, job_id=other.id)
job_retry(tenant=tenant, job_id=other.id)
logged = sorted(set(JobChange.objects.values_list("tenant_id", flat=True)))
made = dispatch()
print(json.dumps({
    "logged": logged,
    "events": [d.payload["type"] for d in made],
    "statuses": [d.payload["data"]["status"] for d in made],
    "result": made[2].payload["data"]["result"],
    "left": JobChange.objects.count(),
}))
"""


def test_sqlite_logs_each_change_and_the_dispatcher_reads_them(
    tmp_path: Path, redis_prefix: str
) -> None:
    env = {
        **stack_env(redis_prefix=redis_prefix, tmp=tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.sqlite3'}",
        "DEBUG": "1",
    }
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], cwd=ROOT, env=env, check=True, timeout=120)
    done = subprocess.run(
        [*manage, "shell", "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["logged"] == ["acme"]
    assert seen["events"] == [
        "job.created",
        "job.started",
        "job.completed",
        "job.created",
        "job.cancelled",
        "job.retrying",
    ]
    assert seen["statuses"] == [
        "PENDING",
        "RUNNING",
        "COMPLETED",
        "PENDING",
        "CANCELLED",
        "PENDING",
    ]
    assert seen["result"] == {"sleptMs": 1}
    assert seen["left"] == 0
