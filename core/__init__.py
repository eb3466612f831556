"""REST core: a slim JSON handler layer on an asyncpg pool (issue 3)."""

__all__: list[str] = []
