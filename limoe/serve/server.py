"""Running the service: `run_server` (what `limoe serve` calls) and `BackgroundServer`
(a real uvicorn server on a thread, for tests and benchmarks)."""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
import warnings

import uvicorn
from PIL import Image

from ..embedder import Embedder
from .app import create_app
from .settings import API_KEY_ENV, ServeSettings

log = logging.getLogger("limoe.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
               settings: ServeSettings | None = None, log_level: str = "info") -> None:
    """Load the export and serve it until interrupted (Ctrl+C finishes in-flight requests first)."""
    settings = settings or ServeSettings()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Pillow only warns between 1x and 2x its own pixel limit; the service refuses instead.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    if not is_loopback(host) and not settings.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the model "
                    "(set --api-key or %s)", host, API_KEY_ENV)
    # Batches the batcher coalesces run as one forward pass.
    embedder = Embedder(model_dir, device=device, batch_size=settings.max_batch_size,
                        max_image_pixels=settings.max_image_pixels,
                        max_image_aspect_ratio=settings.max_image_aspect_ratio)
    app = create_app(embedder, settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


class BackgroundServer:
    """`with BackgroundServer(app) as server:` serves `app` on `server.url` from a thread.

    Port 0 (the default) takes a free port; the socket is bound before the
    thread starts, so there is no race for it.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        # proto=IPPROTO_TCP: asyncio only sets TCP_NODELAY on such sockets (else keep-alive
        # requests stall ~40 ms on Nagle + delayed ACK).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.host, self.port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        if self.sock is not None:
            self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
