"""The HTTP API (FastAPI): the app factory, routers, schemas, auth and the error envelope."""
