"""Run an ASGI app with uvicorn in a background thread: tests and `smi dev` use it alike."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerThread:
    """A uvicorn server on a loopback port, started and stopped from synchronous code."""

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_level: str = "warning",
        trusted_proxies: Sequence[str] = (),
    ):
        """`trusted_proxies` (Settings.trusted_proxy_list() for our API): the peers whose X-Forwarded-For
        is believed; none by default, where uvicorn's own default would trust loopback peers."""
        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(
            app,
            host=self.host,
            port=self.port,
            log_level=log_level,
            lifespan="on",
            proxy_headers=True,
            forwarded_allow_ips=list(trusted_proxies),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn:{self.port}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
