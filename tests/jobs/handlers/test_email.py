"""The email handler: the message it builds, what its schema refuses, and how a real SMTP server's
answers become results, permanent failures or retryable ones. The sender policy and recipient
budget, which span the API and the worker, are in tests/jobs/test_email_policy.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from jobs.handlers import PermanentError
from jobs.handlers.email import EmailSendError
from tests.support.handlers import error_messages, run_sync, validate
from tests.support.smtp_server import SMTPServer
from tests.support.stack import free_port


def test_email_sends_one_message_with_html_alternative(
    mailoutbox: list[Any], settings: Any
) -> None:
    settings.DEFAULT_FROM_EMAIL = "jobs@example.com"
    payload = {
        "to": "alice@example.com",
        "subject": "Your report",
        "body": "Plain text body",
        "html": "<p>HTML body</p>",
    }
    assert run_sync("email", payload) == {"sent": 1}
    assert len(mailoutbox) == 1
    message = mailoutbox[0]
    assert message.to == ["alice@example.com"]
    assert message.subject == "Your report"
    assert message.body == "Plain text body"
    assert message.from_email == "jobs@example.com"
    assert message.alternatives == [("<p>HTML body</p>", "text/html")]


def test_email_to_a_list_with_from(mailoutbox: list[Any], settings: Any) -> None:
    settings.JOBS = {**settings.JOBS, "EMAIL_ALLOWED_SENDERS": ["example.com"]}
    payload = {
        "to": ["a@example.com", "Bob Builder <bob@example.org>"],
        "subject": "",
        "body": "hi",
        "from": "Reports <reports@example.com>",
    }
    assert run_sync("email", payload) == {"sent": 1}
    (message,) = mailoutbox
    assert message.to == ["a@example.com", "Bob Builder <bob@example.org>"]
    assert message.from_email == "Reports <reports@example.com>"
    assert message.alternatives == []
    assert "Bob Builder <bob@example.org>" in message.message()["To"]


def test_email_schema_accepts_python_field_name_for_from() -> None:
    payload = validate("email", {"to": "a@example.com", "subject": "s", "body": "b"})
    assert payload.to == ["a@example.com"] and payload.from_address is None
    payload = validate(
        "email", {"to": "a@example.com", "subject": "s", "body": "b", "from_address": "x@y.io"}
    )
    assert payload.from_address == "x@y.io"


GOOD_EMAIL = {"to": "a@example.com", "subject": "s", "body": "b"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"to": "not-an-address"}, "not a valid email address"),
        ({"to": ["a@example.com", "nope@"]}, "not a valid email address"),
        ({"to": []}, "at least 1 item"),
        ({"to": [f"u{i}@example.com" for i in range(51)]}, "at most 50 items"),
        ({"to": 5}, "valid list"),
        ({"to": "a@example.com\r\nBcc: victim@example.com"}, "line breaks"),
        ({"to": '"Evil, Inc" <a@example.com>'}, "not a valid email address"),
        ({"to": "x" * 321 + "@example.com"}, "at most 320 characters"),
        ({"subject": "hello\nBcc: victim@example.com"}, "line breaks"),
        ({"subject": "s" * 999}, "at most 998 characters"),
        ({"subject": None}, "valid string"),
        ({"body": "é" * 600_000}, "at most 1048576 bytes"),
        ({"body": "b" * (1024 * 1024 + 1)}, "at most 1048576 characters"),
        ({"html": "é" * 600_000}, "at most 1048576 bytes"),
        ({"from": "bad address"}, "not a valid email address"),
        ({"cc": "a@example.com"}, "Extra inputs"),
    ],
)
def test_email_rejects_bad_payloads(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate("email", {**GOOD_EMAIL, **changes})
    assert message in error_messages(info.value)


def test_email_requires_to_subject_and_body() -> None:
    with pytest.raises(ValidationError) as info:
        validate("email", {})
    assert {e["loc"][0] for e in info.value.errors()} == {"to", "subject", "body"}


def test_email_over_smtp_reaches_the_server(smtp_server: SMTPServer) -> None:
    payload = {**GOOD_EMAIL, "to": ["a@example.com", "b@example.com"], "subject": "Hello SMTP"}
    assert run_sync("email", payload) == {"sent": 1}
    assert len(smtp_server.messages) == 1
    assert "Subject: Hello SMTP" in smtp_server.messages[0]
    assert [r.split(":", 1)[1].strip() for r in smtp_server.recipients] == [
        "<a@example.com>",
        "<b@example.com>",
    ]


def test_email_refused_recipient_is_permanent(smtp_server: SMTPServer) -> None:
    smtp_server.rcpt_reply = "550 5.1.1 no such user"
    with pytest.raises(PermanentError, match=r"email recipients refused: a@example\.com"):
        run_sync("email", GOOD_EMAIL)
    assert smtp_server.messages == []


def test_email_temporarily_refused_recipient_is_retryable(smtp_server: SMTPServer) -> None:
    smtp_server.rcpt_reply = "450 4.2.1 mailbox busy"
    with pytest.raises(EmailSendError, match="email recipients refused") as info:
        run_sync("email", GOOD_EMAIL)
    assert not isinstance(info.value, PermanentError)


def test_email_connection_refused_is_retryable(smtp_server: SMTPServer, settings: Any) -> None:
    settings.EMAIL_PORT = free_port()  # nothing listens there
    with pytest.raises(EmailSendError, match=r"email send failed: .*refused") as info:
        run_sync("email", GOOD_EMAIL)
    assert not isinstance(info.value, PermanentError)
