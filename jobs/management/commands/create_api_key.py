"""`manage.py create_api_key <tenant> [--name NAME]`: a new API key, printed once."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.models import Tenant
from jobs.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for a tenant. The full key is printed once, as the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("tenant_id", metavar="tenant", help="id of an existing tenant")
        parser.add_argument("--name", default="", help="a label for the key, e.g. its user")

    def handle(self, *args: Any, **options: Any) -> None:
        tenant_id: str = options["tenant_id"]
        tenant = Tenant.objects.filter(pk=tenant_id).first()
        if tenant is None:
            raise CommandError(f"no tenant {tenant_id!r} (create it with create_tenant)")
        if not tenant.is_active:
            self.stderr.write(
                f"warning: tenant {tenant.id!r} is inactive; the key works once it is reactivated"
            )
        key, raw_key = api_key_create(tenant=tenant, name=options["name"])
        self.stdout.write(f"Created API key {key.prefix} for tenant {tenant.id!r}:")
        self.stdout.write(raw_key)
