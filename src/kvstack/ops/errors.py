"""The one exception the operations CLI shows as is. It lives below every kvstack.ops module (and
below kvstack.cli, which catches it) so that the modules depend downward only."""

from __future__ import annotations


class CommandError(Exception):
    """A failure to show the user as is: what failed and what to do next (no traceback)."""
