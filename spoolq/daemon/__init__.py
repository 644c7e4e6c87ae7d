"""The daemon: one supervisor per spool root (``spoolq serve``), dispatching queue scripts."""

from .supervisor import Daemon

__all__ = ["Daemon"]
