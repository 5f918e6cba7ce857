"""The limoe HTTP service (FastAPI + uvicorn): `pip install -e .[serve]`, then `limoe serve --model DIR`.

    from limoe.serve import ServeSettings, create_app, run_server, BackgroundServer

Only this package imports fastapi and uvicorn, and only when `create_app`,
`run_server` or `BackgroundServer` is used: `limoe.serve.settings` stays
importable without them (the CLI reads its defaults there).
"""
from .settings import API_KEY_ENV, ServeSettings

__all__ = ["API_KEY_ENV", "BackgroundServer", "ServeSettings", "create_app", "run_server"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app
        return create_app
    if name in ("BackgroundServer", "run_server"):
        from . import server
        return getattr(server, name)
    raise AttributeError(f"module 'limoe.serve' has no attribute {name!r}")
