"""`email` jobs: one message through Django's email framework (SMTP, console, file or locmem)."""

from __future__ import annotations

import re
import smtplib
from typing import Annotated, Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.mail import BadHeaderError, EmailMultiAlternatives, get_connection
from django.core.validators import validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

from jobs.handlers.registry import JobContext, PermanentError, register

MAX_RECIPIENTS = 50
MAX_SUBJECT_CHARS = 998  # RFC 5322 line length limit
MAX_BODY_BYTES = 1024 * 1024

# "Display Name <user@example.com>"; names with characters that need quoting are refused.
_NAMED_ADDRESS_RE = re.compile(r"(?P<name>[^<>\"@,;]*?)\s*<(?P<address>[^<>]+)>")


class EmailSendError(Exception):
    """Sending failed in a way a later attempt may not (server down, temporary refusal)."""


def _check_address(value: str) -> str:
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("an email address must not contain line breaks")
    value = value.strip()
    match = _NAMED_ADDRESS_RE.fullmatch(value)
    address = match["address"].strip() if match else value
    try:
        validate_email(address)
    except DjangoValidationError:
        raise ValueError(f"not a valid email address: {address[:100]!r}") from None
    return value


def _check_size(value: str) -> str:
    if len(value.encode()) > MAX_BODY_BYTES:
        raise ValueError(f"must be at most {MAX_BODY_BYTES} bytes of UTF-8")
    return value


def _no_line_breaks(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("must not contain line breaks")
    return value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


EmailAddress = Annotated[str, StringConstraints(max_length=320), AfterValidator(_check_address)]
Text = Annotated[str, StringConstraints(max_length=MAX_BODY_BYTES), AfterValidator(_check_size)]


class EmailPayload(BaseModel):
    """Payload of an `email` job: `to` is one address or a list of 1 to 50."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: Annotated[
        list[EmailAddress],
        BeforeValidator(_as_list),
        Field(min_length=1, max_length=MAX_RECIPIENTS),
    ]
    subject: Annotated[
        str, StringConstraints(max_length=MAX_SUBJECT_CHARS), AfterValidator(_no_line_breaks)
    ]
    body: Text
    html: Text | None = None
    from_address: EmailAddress | None = Field(default=None, alias="from")


def _is_permanent_smtp_code(code: Any) -> bool:
    return isinstance(code, int) and 500 <= code < 600


@register("email", schema=EmailPayload, timeout_s=60)
def send_email(payload: EmailPayload, ctx: JobContext) -> dict[str, int]:
    """Send the message (HTML as an alternative part); `{sent: n}`.

    Refused recipients or sender (5xx) are permanent failures; connection problems are retried.
    """
    message = EmailMultiAlternatives(
        subject=payload.subject,
        body=payload.body,
        from_email=payload.from_address,  # None means DEFAULT_FROM_EMAIL
        to=payload.to,
        connection=get_connection(),
    )
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


def _decode(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return " ".join(text.split())[:200]
