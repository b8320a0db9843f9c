"""`manage.py create_tenant <id> [--name NAME] [--if-missing]`: a tenant, its first webhook signing
secret and its first API key."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from jobs.errors import Conflict
from jobs.models import SigningSecret, Tenant
from jobs.services import api_key_create, tenant_create


class Command(BaseCommand):
    help = (
        "Create a tenant, its first webhook signing secret and its first API key. The secret is "
        "printed once, before the key; the full key is printed once, as the last line of the "
        "output (scripts can take it with `tail -n1`)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("tenant_id", help="stable tenant id: letters, digits, '-', '_'")
        parser.add_argument("--name", default="", help="display name (default: the id)")
        parser.add_argument(
            "--if-missing",
            action="store_true",
            help="if the tenant already exists, create a new API key for it instead of failing",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        tenant_id: str = options["tenant_id"]
        if_missing: bool = options["if_missing"]
        # One transaction: a tenant is never left behind without the key this command promised.
        with transaction.atomic():
            tenant = Tenant.objects.filter(pk=tenant_id).first()
            created = tenant is None
            if tenant is None:
                tenant = self._create(tenant_id, options["name"], if_missing=if_missing)
            elif not if_missing:
                raise CommandError(
                    f"tenant {tenant_id!r} already exists "
                    "(use --if-missing to create a new API key for it)"
                )
            key, raw_key = api_key_create(tenant=tenant, name="created by create_tenant")

        if created:
            # Made with the tenant by tenant_create; shown here once, never again.
            secret = SigningSecret.objects.filter(tenant=tenant).latest("created_at", "id")
            self.stdout.write(
                f"Created tenant {tenant.id!r} ({tenant.name}); webhook signing secret "
                "(shown once):"
            )
            self.stdout.write(secret.secret)
            self.stdout.write(f"API key {key.prefix}:")
        else:
            self.stdout.write(f"Tenant {tenant.id!r} exists; created a new API key {key.prefix}:")
        self.stdout.write(raw_key)

    def _create(self, tenant_id: str, name: str, *, if_missing: bool) -> Tenant:
        try:
            with transaction.atomic():
                return tenant_create(tenant_id=tenant_id, name=name)
        except ValidationError as exc:
            raise CommandError(f"invalid tenant: {'; '.join(exc.messages)}") from exc
        except Conflict as exc:
            # Lost a race with a concurrent creation of the same tenant.
            if if_missing:
                return Tenant.objects.get(pk=tenant_id)
            raise CommandError(exc.message) from exc
