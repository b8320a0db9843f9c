"""`email` jobs: one message through Django's email framework (SMTP, console, file or locmem).

Header fields never carry a line break of any kind, and a message is only ever sent from an
allowed sender (DEFAULT_FROM_EMAIL, or what JOBS_EMAIL_ALLOWED_SENDERS allows): the API refuses
other senders, and the handler checks both again when it runs (docs/security.md).
"""

from __future__ import annotations

import json
import logging
import re
import smtplib
from typing import Annotated, Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.mail import BadHeaderError, EmailMultiAlternatives, get_connection
from django.core.validators import validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from jobs.handlers.registry import JobContext, PermanentError, register

logger = logging.getLogger(__name__)

MAX_RECIPIENTS = 50
MAX_REPLY_TO = 10
MAX_SUBJECT_CHARS = 998  # RFC 5322 line length limit
MAX_BODY_BYTES = 1024 * 1024

# "Display Name <user@example.com>"; names with characters that need quoting are refused.
_NAMED_ADDRESS_RE = re.compile(r"(?P<name>[^<>\"@,;]*?)\s*<(?P<address>[^<>]+)>")
# Control characters (tab aside) and the Unicode line and paragraph separators. Python's email
# package folds a header with str.splitlines(), which ends a line at VT, FF, \x1c-\x1e, NEL,
# U+2028 and U+2029 as well as at CR and LF: any of them in a subject used to start a header of
# the tenant's choosing on the wire ("Subject: x\x0bReply-To: ...").
_HEADER_BREAK_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


class EmailSendError(Exception):
    """Sending failed in a way a later attempt may not (server down, temporary refusal)."""


def header_break(value: str) -> str | None:
    """The first character of `value` that must not be in a header field (`U+000B`), or None."""
    found = _HEADER_BREAK_RE.search(value)
    return f"U+{ord(found.group()):04X}" if found else None


def _header_safe(value: str) -> str:
    found = header_break(value)
    if found is not None:
        raise ValueError(f"must not contain line breaks or other control characters ({found})")
    return value


def address_of(value: str) -> str:
    """The address part of `user@example.com` or `Name <user@example.com>`."""
    match = _NAMED_ADDRESS_RE.fullmatch(value.strip())
    return match["address"].strip() if match else value.strip()


def _check_address(value: str) -> str:
    value = _header_safe(value).strip()
    address = address_of(value)
    try:
        validate_email(address)
    except DjangoValidationError:
        raise ValueError(f"not a valid email address: {address[:100]!r}") from None
    return value


def allowed_sender(value: str) -> bool:
    """Whether `value` may be a message's sender: DEFAULT_FROM_EMAIL's address, or one that
    JOBS_EMAIL_ALLOWED_SENDERS lists (an address, or a whole domain as `@domain` or `domain`).
    Case-insensitive; a domain entry does not cover its subdomains."""
    address = address_of(value).lower()
    domain = address.rpartition("@")[2]
    if address == address_of(settings.DEFAULT_FROM_EMAIL).lower():
        return True
    for entry in settings.JOBS["EMAIL_ALLOWED_SENDERS"]:
        entry = entry.strip().lower()
        if "@" in entry.removeprefix("@"):
            if address == entry:
                return True
        elif domain == entry.removeprefix("@"):
            return True
    return False


def _check_size(value: str) -> str:
    if len(value.encode()) > MAX_BODY_BYTES:
        raise ValueError(f"must be at most {MAX_BODY_BYTES} bytes of UTF-8")
    return value


def _one_or_many(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One address stands for a list of one; its error is reported at the field itself (`to`),
    not at a list index the client never wrote (`to.0`)."""
    if not isinstance(value, str):
        return handler(value)
    try:
        return handler([value])
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        raise PydanticCustomError(first["type"], first["msg"]) from None


EmailAddress = Annotated[str, StringConstraints(max_length=320), AfterValidator(_check_address)]
ReplyTo = Annotated[
    list[EmailAddress],
    WrapValidator(_one_or_many),
    Field(min_length=1, max_length=MAX_REPLY_TO),
]
Text = Annotated[str, StringConstraints(max_length=MAX_BODY_BYTES), AfterValidator(_check_size)]


class EmailPayload(BaseModel):
    """Payload of an `email` job: `to` is one address or a list of 1 to 50. `from` must be an
    allowed sender (checked by the API, jobs/validation.py); `replyTo` is where replies go."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: Annotated[
        list[EmailAddress],
        WrapValidator(_one_or_many),
        Field(min_length=1, max_length=MAX_RECIPIENTS),
    ]
    subject: Annotated[
        str, StringConstraints(max_length=MAX_SUBJECT_CHARS), AfterValidator(_header_safe)
    ]
    body: Text
    html: Text | None = None
    from_address: EmailAddress | None = Field(default=None, alias="from")
    reply_to: ReplyTo | None = Field(default=None, alias="replyTo")
    # Append the results of the jobs this email waits for (`dependsOn`) to the body, as JSON.
    include_dependency_results: bool = Field(
        default=False, alias="includeDependencyResults", strict=True
    )


# At most this much of the dependencies' results is appended to a body.
MAX_RESULTS_CHARS = 50_000


def with_dependency_results(body: str, results: dict[str, Any]) -> str:
    """The body followed by each dependency's result (JSON, in `dependsOn` order), cut to
    MAX_RESULTS_CHARS."""
    if not results:
        return body
    lines = [f"{job_id}: {json.dumps(value, sort_keys=True)}" for job_id, value in results.items()]
    appended = "\n".join(lines)
    if len(appended) > MAX_RESULTS_CHARS:
        appended = appended[:MAX_RESULTS_CHARS] + "\n[cut]"
    return f"{body}\n\nResults of the jobs this email waited for:\n{appended}\n"


def _is_permanent_smtp_code(code: Any) -> bool:
    return isinstance(code, int) and 500 <= code < 600


@register("email", schema=EmailPayload, timeout_s=60)
def send_email(payload: EmailPayload, ctx: JobContext) -> dict[str, int]:
    """Send the message (HTML as an alternative part); `{sent: n}`.

    Refused recipients or sender (5xx) are permanent failures; connection problems are retried.
    """
    from_email, reply_to = _sender(payload, ctx)
    body = payload.body
    if payload.include_dependency_results:
        body = with_dependency_results(body, ctx.dependency_results)
    message = EmailMultiAlternatives(
        subject=payload.subject,
        body=body,
        from_email=from_email,  # None means DEFAULT_FROM_EMAIL
        to=payload.to,
        reply_to=reply_to,
        connection=get_connection(),
    )
    _check_headers(message)
    if payload.html is not None:
        message.attach_alternative(payload.html, "text/html")
    try:
        sent = message.send()
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _msg in exc.recipients.values()]
        refused = ", ".join(sorted(exc.recipients))[:200]
        text = f"email recipients refused: {refused}"
        # All refusals temporary (4xx, e.g. mailbox busy): a later attempt may get through.
        if codes and not any(_is_permanent_smtp_code(code) for code in codes):
            raise EmailSendError(text) from exc
        raise PermanentError(text) from exc
    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
        text = f"email refused by the server: {exc.smtp_code} {_decode(exc.smtp_error)}"
        if _is_permanent_smtp_code(exc.smtp_code):
            raise PermanentError(text) from exc
        raise EmailSendError(text) from exc
    except BadHeaderError as exc:
        raise PermanentError(f"email invalid: {exc}") from exc
    except (smtplib.SMTPException, OSError) as exc:
        raise EmailSendError(f"email send failed: {str(exc) or type(exc).__name__}") from exc
    return {"sent": sent}


def _sender(payload: EmailPayload, ctx: JobContext) -> tuple[str | None, list[str]]:
    """From (None: DEFAULT_FROM_EMAIL) and Reply-To of the message. A sender that is not allowed
    (the job was stored before the policy, or the setting changed since) never sends: the
    default sender does, and replies go to the requested one unless `replyTo` says otherwise."""
    reply_to = list(payload.reply_to or ())
    requested = payload.from_address
    if requested is None or allowed_sender(requested):
        return requested, reply_to
    logger.warning(
        "email sender not allowed by JOBS_EMAIL_ALLOWED_SENDERS: sent from DEFAULT_FROM_EMAIL",
        extra={"job_id": ctx.job_id, "tenant": ctx.tenant, "job_type": ctx.type},
    )
    return None, reply_to or [requested]


def _check_headers(message: EmailMultiAlternatives) -> None:
    """Refuse the message if a header field holds a line break: the payload schema refuses
    them, and this holds even for a payload that was never validated."""
    fields = {
        "subject": [message.subject],
        "from": [message.from_email],
        "to": message.to,
        "replyTo": message.reply_to,
    }
    for name, values in fields.items():
        for value in values:
            found = header_break(value)
            if found is not None:
                raise PermanentError(
                    f"email invalid: {name} must not contain line breaks or other control "
                    f"characters ({found})"
                )


def _decode(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return " ".join(text.split())[:200]
