"""`manage.py revoke_api_key <prefix>`: revoke a key by the prefix shown in the admin."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.errors import NotFound
from jobs.services import api_key_revoke


class Command(BaseCommand):
    help = "Revoke an API key, given its prefix (as shown in the admin) or the key's `jq_<prefix>`."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prefix", help="the key's prefix, `jq_<prefix>` or the whole key")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            key = api_key_revoke(prefix=options["prefix"].strip())
        except NotFound as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            f"Revoked API key {key.prefix} of tenant {key.tenant_id!r} "
            f"(revoked at {key.revoked_at:%Y-%m-%d %H:%M:%S %Z})."
        )
