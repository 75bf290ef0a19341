"""The coordinator's web dashboard at `GET /ui` (see dashboard.py)."""

from .dashboard import Dashboard, is_public

__all__ = ["Dashboard", "is_public"]
