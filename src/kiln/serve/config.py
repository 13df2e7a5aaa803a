"""``ServeConfig``: every knob of ``kiln serve`` (each attribute's docstring is its ``--help``)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """How ``kiln serve`` listens, what it accepts and how it sheds load. The defaults run."""

    host: str = "127.0.0.1"
    """Address to bind. Anything but loopback needs --api-key (the server is then reachable by others)."""
    port: int = 8000
    """TCP port (0: pick a free one and print it)."""
    api_key: str | None = None
    """Clients must send 'Authorization: Bearer KEY' to /v1/*; compared in constant time."""
    model_name: str = ""
    """The model id clients pass as "model" (default: the model folder's name)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (bytes); larger bodies get 413."""
    max_pending: int = 256
    """Most sequences admitted at once (running + waiting in the engine; n counts n). Beyond: 429."""
    request_timeout_s: float = 600.0
    """A request still generating after this many seconds is aborted (504, or an error event)."""
    default_max_tokens: int = 512
    """max_tokens when a request gives none (cut to what the context has room for)."""
    shutdown_grace_s: float = 10.0
    """On SIGINT/SIGTERM, in-flight requests get this long to finish; then they are cancelled."""
    max_n: int = 16
    """Largest n (choices per request)."""
    max_stop: int = 8
    """Most stop strings per request."""
    engine_process: bool = True
    """Run the engine in its own process (vLLM V1's engine-core layout): the HTTP side and the engine
    stop sharing one GIL; the model is loaded in the child. --no-engine-process: the engine in a
    thread of the server process (one process; 0.55-0.75x the throughput on 2 CPU cores)."""

    def __post_init__(self) -> None:
        if not _is_loopback(self.host) and not self.api_key:
            raise ValueError(
                f"--host {self.host} exposes the server beyond this machine; set --api-key KEY too "
                "(clients then send 'Authorization: Bearer KEY'), or keep the default --host 127.0.0.1"
            )
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("--api-key must be at least 8 characters long")
        for name in ("max_body_bytes", "max_pending", "default_max_tokens", "max_n", "max_stop"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--request-timeout must be > 0 seconds, got {self.request_timeout_s}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
