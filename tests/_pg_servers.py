"""Private PostgreSQL instances (run as user postgres) for tests that stop or kill the database."""

__all__: list[str] = []
