"""Revision scripts, applied in order by Alembic (see migrations/__init__.py)."""
