"""Running one queue script: spawn it (``spawn``) and interpret what it says (``protocol``)."""

from .protocol import Completion, LineBuffer, Outcome, decide, parse_completion, parse_dup, split_line
from .spawn import ScriptError, Spawned, build_argv, build_env, resolve_script, spawn

__all__ = ["Completion", "LineBuffer", "Outcome", "ScriptError", "Spawned", "build_argv", "build_env",
           "decide", "parse_completion", "parse_dup", "resolve_script", "spawn", "split_line"]
