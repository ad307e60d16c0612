"""Fixtures shared by every test directory."""

from tests.postgres import postgres_db, postgres_server, postgres_shared_db, postgres_url

#: The fixtures this conftest makes visible to every test.
__all__ = ["postgres_db", "postgres_server", "postgres_shared_db", "postgres_url"]
