"""Transports: each adapts its I/O to one transport-agnostic Session."""

__all__: list[str] = []
