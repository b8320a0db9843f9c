"""A real local SMTP server for email tests: records envelopes and messages, answers RCPT as
told. Just enough SMTP for smtplib (and so for Django's SMTP backend)."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _SMTPHandler(socketserver.StreamRequestHandler):
    server: _SMTPServer

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        owner = self.server.owner
        self.reply("220 test.local ESMTP")
        in_data, lines = False, []
        for raw in self.rfile:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if in_data:
                if line == ".":
                    owner.messages.append("\n".join(lines))
                    in_data, lines = False, []
                    self.reply("250 queued")
                else:
                    lines.append(line[1:] if line.startswith("..") else line)
                continue
            verb = line[:4].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250 test.local")
            elif verb == "MAIL":
                # "MAIL FROM:<address> [parameters]": the envelope sender.
                owner.senders.append(line.partition("<")[2].partition(">")[0])
                self.reply("250 ok")
            elif verb == "RCPT":
                owner.recipients.append(line)
                self.reply(owner.rcpt_reply)
            elif verb in ("RSET", "NOOP"):
                self.reply("250 ok")
            elif verb == "DATA":
                in_data = True
                self.reply("354 end with .")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("502 not implemented")


class _SMTPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: SMTPServer


class SMTPServer:
    """Listens on 127.0.0.1 (a free port) until `close()`.

    `messages`: each message's DATA as text (lines joined with "\\n"); `senders`: each MAIL FROM
    address; `recipients`: each RCPT command line as received."""

    def __init__(self, rcpt_reply: str = "250 ok") -> None:
        self.rcpt_reply = rcpt_reply
        self.messages: list[str] = []
        self.senders: list[str] = []
        self.recipients: list[str] = []
        self._server = _SMTPServer(("127.0.0.1", 0), _SMTPHandler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def headers(self, index: int = 0) -> list[str]:
        """The header lines of message `index`, as the server received them (unfolded lines
        stay separate: a line that starts a new header is a header to any mail server)."""
        head, _, _ = self.messages[index].partition("\n\n")
        return head.split("\n")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def smtp_server_for(settings: Any) -> Iterator[SMTPServer]:
    """A running SMTPServer with Django's email settings (pytest-django's `settings`) pointed
    at it; stopped afterwards."""
    server = SMTPServer()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = server.port
    settings.EMAIL_HOST_USER = ""
    settings.EMAIL_HOST_PASSWORD = ""
    settings.EMAIL_USE_TLS = False
    settings.EMAIL_USE_SSL = False
    settings.EMAIL_TIMEOUT = 5
    try:
        yield server
    finally:
        server.close()
