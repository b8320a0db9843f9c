"""`event_delivery` jobs: one event of a tenant's job POSTed to one event subscription's URL
(SPEC section 14). Created by the dispatcher (jobs/events_dispatch.py), never by tenants.

The request goes through the webhook machinery (`webhook.send`): the SSRF guard, the
destination's cap and circuit breaker, Standard Webhooks signatures with `webhook-id` = the
event id. Every attempt that reaches the request writes a row of the delivery log. Events of
one job reach one subscription in order: a delivery waits (held, its attempt not spent) while
an earlier one of the same job is not finished. A deleted subscription's deliveries complete
without a request (`{"skipped": ...}`).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated, Any, Literal

from django.utils import timezone
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from jobs import events, selectors, services
from jobs.handlers import webhook
from jobs.handlers.registry import HeldBack, JobContext, register
from jobs.orm import orm

# Waits before retries 1 to 10: 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, 8 h, 8 h (each
# 90-100% of its entry): the last attempt is at most 23 h 43 min after the first.
RETRY_DELAYS_S = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800)
MAX_ATTEMPTS = len(RETRY_DELAYS_S) + 1
REQUEST_TIMEOUT_MS = 10_000
# How long a delivery waits for the earlier one of its job before it looks again (at least).
ORDER_WAIT = timedelta(milliseconds=500)
ORDER_REASON = "an earlier event of this job is not delivered yet"


class EventDeliveryPayload(BaseModel):
    """Payload of an `event_delivery` job: the event, and the subscription it goes to."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    subscription_id: uuid.UUID = Field(alias="subscriptionId")
    event_id: Annotated[str, StringConstraints(min_length=1, max_length=100)] = Field(
        alias="eventId"
    )
    type: Literal[events.EVENT_TYPES]  # type: ignore[valid-type]
    timestamp: str
    data: dict[str, Any]


@register(
    events.EVENT_DELIVERY,
    schema=EventDeliveryPayload,
    timeout_s=30,
    signed=True,
    retry_delays_s=RETRY_DELAYS_S,
)
async def deliver_event(payload: EventDeliveryPayload, ctx: JobContext) -> dict[str, Any]:
    """POST `{type, timestamp, data}` to the subscription's URL; 2xx completes, anything else
    fails the attempt as a webhook's would (and is logged)."""
    subscription = await orm(selectors.event_subscription_find)(
        subscription_id=payload.subscription_id
    )
    if subscription is None:
        return {"skipped": "the event subscription was deleted"}
    job_id = payload.data["id"]
    cursor = int(payload.data["cursor"])
    earlier = await orm(selectors.event_delivery_earlier_run_at)(
        tenant_id=ctx.tenant, subscription_id=subscription.id, job_id=job_id, cursor=cursor
    )
    if earlier is not None:
        raise HeldBack(max(timezone.now() + ORDER_WAIT, earlier), ORDER_REASON)
    request = webhook.WebhookPayload(
        url=subscription.url,
        method="POST",
        body={"type": payload.type, "timestamp": payload.timestamp, "data": payload.data},
        timeout_ms=REQUEST_TIMEOUT_MS,
    )
    log = orm(services.event_delivery_log)
    fields = {
        "subscription": subscription,
        "job_id": job_id,
        "event_type": payload.type,
        "event_id": payload.event_id,
        "attempt": ctx.attempt,
    }
    started = timezone.now()
    try:
        answer = await webhook.send(request, ctx, msg_id=payload.event_id)
    except HeldBack:
        raise
    except Exception as exc:
        duration_ms = round((timezone.now() - started).total_seconds() * 1000)
        await log(**fields, status_code=None, duration_ms=duration_ms, error=str(exc))
        raise
    if not 200 <= answer.status < 300:
        error = webhook.status_error(answer.status, answer.body)
        await log(
            **fields, status_code=answer.status, duration_ms=answer.duration_ms, error=str(error)
        )
        raise error
    await log(**fields, status_code=answer.status, duration_ms=answer.duration_ms, error=None)
    return {"statusCode": answer.status, "durationMs": answer.duration_ms}
