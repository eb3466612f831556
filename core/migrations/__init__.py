"""Numbered SQL migrations, read by core.migrate (package data, no code)."""

__all__: list[str] = []
