"""WAHA sandbox: the stand-in for WhatsApp (through WAHA's HTTP API) in `make run`, tests and bench.

Its own program: ``python -m waha_sandbox``. See README.md beside this file for its control API."""
