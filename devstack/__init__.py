"""Local infrastructure for `make run` and the test suite: private PostgreSQL and Redis servers."""
