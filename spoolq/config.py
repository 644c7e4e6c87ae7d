"""The spool root: where it is by default, and its ``config.json`` (host and port).

The host and port name this machine in full message ids
(``http://<host>:<port>/q/<queue>/<id>``) and in ``RQ_HOST``; ``spoolq serve --host/--port``
records them so the CLI and the daemon agree.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import durable

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3333
SYSTEM_ROOT = Path("/var/spool/spoolq")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: the only addresses served without a token."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_root() -> str:
    """``$SPOOLQ_ROOT``, else /var/spool/spoolq when writable, else ``$XDG_STATE_HOME/spoolq``."""
    env = os.environ.get("SPOOLQ_ROOT")
    if env:
        return env
    if SYSTEM_ROOT.is_dir() and os.access(SYSTEM_ROOT, os.W_OK):
        return str(SYSTEM_ROOT)
    if not SYSTEM_ROOT.exists() and os.access(SYSTEM_ROOT.parent, os.W_OK):
        return str(SYSTEM_ROOT)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "spoolq")


@dataclass
class RootConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def local_url(self) -> str:
        """The URL a browser on this machine opens: a wildcard address (0.0.0.0, ::) is not
        one to connect to, so it becomes loopback."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"


def read_root_config(root: str | os.PathLike[str]) -> RootConfig:
    """The root's config.json; defaults for anything missing or unreadable."""
    try:
        data = json.loads((Path(root) / "config.json").read_bytes())
    except (OSError, ValueError):
        return RootConfig()
    return root_config_of(data)


def root_config_of(data: Any) -> RootConfig:
    """The host and port recorded in ``data`` (a root's config); defaults for anything else."""
    if not isinstance(data, dict):
        return RootConfig()
    cfg = RootConfig()
    if isinstance(data.get("host"), str) and data["host"]:
        cfg.host = data["host"]
    if isinstance(data.get("port"), int) and not isinstance(data["port"], bool):
        cfg.port = data["port"]
    return cfg


def write_root_config(root: str | os.PathLike[str], cfg: RootConfig) -> bool:
    """Record host and port in the root's config.json, keeping its other keys. Writes only
    when they differ from what is there (a daemon must start on a full disk); returns
    whether it wrote. OSError when the write fails."""
    path = Path(root) / "config.json"
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    if data.get("host") == cfg.host and data.get("port") == cfg.port and type(data.get("port")) is int:
        return False
    data.update({"host": cfg.host, "port": cfg.port})
    durable.write_replace(path, (json.dumps(data, indent=2) + "\n").encode())
    return True
