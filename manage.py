#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

from __future__ import annotations

import os
import sys

# A configuration mistake (SECRET_KEY missing with DEBUG off, a malformed setting) is the
# operator's to fix, not a bug: one line on stderr says what, and the exit status is 2, as for a
# usage error. A traceback would bury that line under thirty others.
CONFIGURATION_ERROR_STATUS = 2


def main() -> None:
    """Run administrative tasks."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    try:
        from django.core.exceptions import ImproperlyConfigured
        from django.core.management import execute_from_command_line
    except ImportError as exc:
        raise ImportError(
            "Couldn't import Django. Are you sure it's installed and "
            "available on your PYTHONPATH environment variable? Did you "
            "forget to activate a virtual environment?"
        ) from exc
    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(CONFIGURATION_ERROR_STATUS)


if __name__ == "__main__":
    main()
