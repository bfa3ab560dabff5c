"""The HTTP API (FastAPI) and the `afina` command line."""
