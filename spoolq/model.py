"""The data model: message, queue configuration, states and their transitions.

Field names follow RQ (``../shared/reference/rq-spec.md`` 1.5 and 1.7: the team's notes on
RQ, outside this repository) so RQ's clients and scripts read spoolq's JSON unchanged.
Validation raises :mod:`spoolq.errors` exceptions with a message that says what was wrong
and what is allowed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from typing_extensions import TypedDict  # pydantic reads it on Python < 3.12 (the HTTP API's schema)

from .errors import InvalidConfig, InvalidMessage, TooLarge
from .ids import bucket_of, validate_queue_name

MAX_MSG_BYTES = 1024 * 1024
MAX_SEND_BYTES = 2 * MAX_MSG_BYTES
"""A message as a sender's JSON may take (escaping can double what is stored): the one
limit HTTP applies to a body or form field before parsing it; the store's MAX_MSG_BYTES
decides."""
"""Largest serialized ``msg`` accepted. Bulk data belongs in attachments."""

DEFAULT_MAX_COUNT = 15
MAX_ENV_VALUE = 128 * 1024 - 64
"""Bytes of a value that reaches a script as an environment variable (param1..4, dest,
orig_msg_id, env_vars). Linux refuses to exec with any one ``NAME=value`` string over
128 KiB (MAX_ARG_STRLEN): such a message could be stored but never run."""
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class State(StrEnum):
    """Where a message is; each state is one directory in the filesystem store."""

    PREP = "prep"
    QUE = "que"
    RUN = "run"
    DONE = "done"
    RELAYED = "relayed"
    ERR = "err"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({State.DONE, State.RELAYED, State.ERR})

COUNT_KEYS = ("prep", "que", "run", "done", "relayed", "err", "err_acked")
"""The keys of ``Store.counts``: each state, with err split into unacked and acked."""

# The only transitions a message may make (docs/internals.md, "State table").
# que->done|relayed: coalesced duplicates finish with their parent without running.
# que->err: a message that cannot be started (script missing) fails without running.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.PREP: frozenset({State.QUE}),
    State.QUE: frozenset({State.RUN, State.DONE, State.RELAYED, State.ERR}),
    State.RUN: frozenset({State.DONE, State.RELAYED, State.ERR, State.QUE}),
    State.ERR: frozenset({State.QUE}),
    State.DONE: frozenset(),
    State.RELAYED: frozenset(),
}


def check_transition(src: State, dst: State) -> None:
    from .errors import WrongState

    if dst not in TRANSITIONS[src]:
        raise WrongState(f"a message cannot go from {src} to {dst}")


class AdminState(StrEnum):
    """A queue's admin state (RQ 6.1): PAUSE accepts but runs nothing; DOWN refuses new messages."""

    UP = "UP"
    PAUSE = "PAUSE"
    DOWN = "DOWN"

    @classmethod
    def of_flags(cls, pause: bool, down: bool) -> AdminState:
        """RQ's rule: the ``down`` flag wins, then ``pause``."""
        return cls.DOWN if down else cls.PAUSE if pause else cls.UP


ADMIN_FLAGS = ("pause", "down")
ADMIN_ACTIONS: dict[str, tuple[str, bool]] = {
    "pause": ("pause", True), "resume": ("pause", False), "down": ("down", True), "up": ("down", False)}
"""RQ's admin actions (rq-spec 6.1): each sets or clears one flag and leaves the other alone."""


def _param(value: Any, name: str) -> str:
    if type(value) is str and value.isascii() and "\x00" not in value:
        return value  # the common case, checked in C: ASCII holds no surrogates
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        text = str(value)
        # Params reach scripts as environment variables (RQ_PARAM1...): no NUL, valid UTF-8.
        if "\x00" in text:
            raise InvalidMessage(f"{name} must not contain a NUL character")
        if not _utf8(text):
            raise InvalidMessage(f"{name} is not valid Unicode text (lone surrogate)")
        return text
    raise InvalidMessage(f"{name} must be a string or a number, not {type(value).__name__}")


def param_text(value: Any) -> str:
    """A param1..4 value as a message carries it (``from_dict``'s conversion: a number 0 is
    "0", true is "true"); InvalidMessage if a message cannot carry it."""
    return _param(value, "param")


def _env_value(text: str, name: str) -> str:
    """``text`` if a script can receive it as an environment variable (see MAX_ENV_VALUE)."""
    if len(text) * 4 > MAX_ENV_VALUE and len(text.encode()) > MAX_ENV_VALUE:
        raise TooLarge(f"{name} is {len(text.encode())} bytes: scripts get it as an environment variable, "
                       f"which Linux caps at 128 KiB; put bulk data in params or an attachment")
    return text


def _utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


_MSG_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
"""One encoder for every stored message: json.dumps with arguments builds a new one per call
(8 us against 4 for a small message)."""
COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))
"""Compact ASCII JSON for the store's small files (status, history lines, counts)."""


MAX_PARAMS_DEPTH = 32
"""How deeply ``params`` may nest: deep enough for any real payload, far from recursion limits."""


def _check_params(value: Any, path: str = "params", depth: int = 0) -> None:
    """``params`` must be plain JSON, nested at most :data:`MAX_PARAMS_DEPTH` deep."""
    if depth > MAX_PARAMS_DEPTH:
        raise InvalidMessage(f"params nest deeper than {MAX_PARAMS_DEPTH} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidMessage(f"{path}: keys must be strings")
            _check_params(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_params(v, f"{path}[{i}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidMessage(f"{path}: numbers must be finite")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise InvalidMessage(f"{path}: {type(value).__name__} is not a JSON value")


def holds_nul(value: Any) -> bool:
    """Does ``value`` (a message's ``params``) hold a NUL character in a key or a string?
    JSON can carry one; PostgreSQL's jsonb cannot (store/pg refuses such a message)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(holds_nul(v) for v in value)
    return False


def _int(value: Any, name: str, lo: int = 0, hi: int = 2**31) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise InvalidMessage(f"{name} must be an integer, got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidMessage(f"{name} must be an integer, got {value!r}") from None
    if not lo <= n <= hi:
        raise InvalidMessage(f"{name} must be between {lo} and {hi}, got {n}")
    return n


def _epoch(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise InvalidMessage(f"{name} must be epoch seconds")
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise InvalidMessage(f"{name} must be epoch seconds, got {value!r}") from None
    if not math.isfinite(t) or t < 0 or t > 32503680000:  # year 3000
        raise InvalidMessage(f"{name} out of range: {value!r}")
    return t


# Keys RQ's get_message adds on read; they may come back on input and are ignored.
DERIVED_KEYS = frozenset({"path", "status", "state", "_attachments", "_method", "history"})


class MessageFields(TypedDict, total=False):
    """What a sender may set on a new message: the one definition (the Python API's
    ``send``/``prep``/``send_many``, the HTTP API's body and its OpenAPI schema, the CLI and
    the UI form all go through it; :meth:`Message.from_dict` validates the values)."""

    param1: str | int | float
    param2: str | int | float
    param3: str | int | float
    param4: str | int | float
    params: Mapping[str, Any]
    due: float
    delay: float
    src: str
    max_count: int
    dest: str
    post_run_webhook: Sequence[str]
    orig_msg_id: str
    count: int


MESSAGE_FIELD_NAMES = frozenset(MessageFields.__annotations__)


@dataclass
class Message:
    """One message. ``msg_id`` and ``created_at`` are set by the store on creation."""

    dest: str = ""
    msg_id: str = ""
    src: str = ""
    count: int = 0
    max_count: int = DEFAULT_MAX_COUNT
    param1: str = ""
    param2: str = ""
    param3: str = ""
    param4: str = ""
    due: float = 0.0
    orig_msg_id: str = ""
    post_run_webhook: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    force_remote: bool = False
    cloned_from: str = ""
    dups: list[str] = field(default_factory=list)
    dup: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Any, *, strict: bool = False) -> Message:
        """Build and validate a message from RQ-style JSON.

        Derived keys (``status``, ``state``...) are ignored. Unknown keys are an error when
        ``strict`` and dropped otherwise (RQ's HTTP clients send extra form fields).
        """
        if not isinstance(data, dict):
            raise InvalidMessage("a message must be a JSON object")
        if strict:
            unknown = set(data) - _MESSAGE_FIELDS - DERIVED_KEYS
            if unknown:
                raise InvalidMessage(f"unknown message field(s): {', '.join(sorted(unknown))}")
        get = data.get
        m = cls()
        m.dest = _env_value(_param(get("dest"), "dest"), "dest")
        m.msg_id = _param(get("msg_id"), "msg_id")
        m.src = _param(get("src"), "src")
        if get("count") not in (None, ""):
            m.count = _int(data["count"], "count")
        if get("max_count") not in (None, ""):
            m.max_count = _int(data["max_count"], "max_count", 1)
        m.param1 = _env_value(_param(get("param1"), "param1"), "param1")
        m.param2 = _env_value(_param(get("param2"), "param2"), "param2")
        m.param3 = _env_value(_param(get("param3"), "param3"), "param3")
        m.param4 = _env_value(_param(get("param4"), "param4"), "param4")
        if data.get("due") not in (None, ""):
            m.due = _epoch(data["due"], "due")
        m.orig_msg_id = _env_value(_param(data.get("orig_msg_id"), "orig_msg_id"), "orig_msg_id")
        hooks = data.get("post_run_webhook") or []
        if isinstance(hooks, str):
            hooks = hooks.split()
        if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
            raise InvalidMessage("post_run_webhook must be a list of URLs")
        for h in hooks:
            if not re.match(r"^https?://\S+$", h):
                raise InvalidMessage(f"post_run_webhook entry is not an http(s) URL: {h!r}")
        m.post_run_webhook = list(hooks)
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise InvalidMessage("params must be a JSON object")
        _check_params(params)
        m.params = params
        if data.get("created_at") not in (None, ""):
            m.created_at = _epoch(data["created_at"], "created_at")
        fr = data.get("force_remote")
        m.force_remote = fr in (True, "true", "yes", "1", 1)
        m.cloned_from = _param(data.get("cloned_from"), "cloned_from")
        dups = data.get("dups") or []
        m.dups = [str(d) for d in dups] if isinstance(dups, list) else []
        m.dup = _param(data.get("dup"), "dup")
        hist = data.get("history") or []
        m.history = [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else []
        return m

    def to_dict(self) -> dict[str, Any]:
        """The stored form: RQ's field names, plus spoolq's own."""
        d: dict[str, Any] = {
            "msg_id": self.msg_id,
            "dest": self.dest,
            "src": self.src,
            "count": self.count,
            "max_count": self.max_count,
            "param1": self.param1,
            "param2": self.param2,
            "param3": self.param3,
            "param4": self.param4,
            "due": self.due,
            "orig_msg_id": self.orig_msg_id,
            "post_run_webhook": list(self.post_run_webhook),
            "params": self.params,
            "created_at": self.created_at,
        }
        if self.force_remote:
            d["force_remote"] = True
        if self.cloned_from:
            d["cloned_from"] = self.cloned_from
        if self.dups:
            d["dups"] = list(self.dups)
        if self.dup:
            d["dup"] = self.dup
        if self.history:
            d["history"] = list(self.history)
        return d

    def encode(self) -> bytes:
        """Serialize for storage, refusing anything over :data:`MAX_MSG_BYTES`."""
        try:
            # UTF-8, not \u escapes: `cat msg` and grep show the text as sent; a lone
            # surrogate cannot be encoded and is refused here.
            data = _MSG_ENCODER.encode(self.to_dict()).encode()
        except (TypeError, ValueError, RecursionError) as e:
            raise InvalidMessage(f"message is not JSON-serializable: {e}") from None
        if len(data) > MAX_MSG_BYTES:
            raise TooLarge(
                f"message is {len(data)} bytes; the limit is {MAX_MSG_BYTES} (put bulk data in an attachment)"
            )
        return data


_MESSAGE_FIELDS = frozenset(Message.__dataclass_fields__)


RETRY_LIMITS = {"base": 365 * 86400.0, "factor": 100.0, "max_delay": 365 * 86400.0, "jitter": 1.0}
"""Upper bounds of the retry parameters: a year between attempts at most, a jitter of 100 %."""


@dataclass
class RetryPolicy:
    """Backoff for exit 111 (temporary failure): ``min(max_delay, base * factor**count)`` ± jitter."""

    base: float = 5.0
    factor: float = 2.0
    max_delay: float = 3600.0
    jitter: float = 0.1

    def delay(self, count: int, rand: float = 0.5) -> float:
        """Delay before attempt ``count`` (``rand`` in [0, 1) spreads it by ``jitter``).

        Never raises: ``factor ** count`` past the float range is simply ``max_delay``."""
        try:
            d = self.base * (self.factor ** min(max(0, count), 100_000))
        except OverflowError:
            d = math.inf
        d = min(self.max_delay, d)
        return max(0.0, d * (1 + self.jitter * (2 * rand - 1)))

    @classmethod
    def from_dict(cls, data: Any) -> RetryPolicy:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InvalidConfig("retry must be an object {base, factor, max_delay, jitter}")
        p = cls()
        for k, hi in RETRY_LIMITS.items():
            if k in data:
                v = data[k]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi:
                    raise InvalidConfig(f"retry.{k} must be a number from 0 to {hi:g}, got {v!r}")
                setattr(p, k, float(v))
        unknown = set(data) - {"base", "factor", "max_delay", "jitter"}
        if unknown:
            raise InvalidConfig(f"unknown retry key(s): {', '.join(sorted(unknown))}")
        return p

    def to_dict(self) -> dict[str, float]:
        return {"base": self.base, "factor": self.factor, "max_delay": self.max_delay, "jitter": self.jitter}


def _param_numbers(value: Any, name: str) -> list[int]:
    if value in (None, ""):
        return []
    if not isinstance(value, list):
        raise InvalidConfig(f"{name} must be a list of param numbers 1-4")
    out: list[int] = []
    for v in value:
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise InvalidConfig(f"{name} must be a list of param numbers 1-4, got {v!r}") from None
        if not 1 <= n <= 4 or isinstance(v, bool):
            raise InvalidConfig(f"{name} must be a list of param numbers 1-4, got {v!r}")
        if n not in out:
            out.append(n)
    return sorted(out)


@dataclass
class QueueConfig:
    """A queue's configuration (``config.json``), RQ's keys plus spoolq's own."""

    name: str
    script: str = ""
    num_workers: int = 1  # per host
    cluster_workers: int | None = None  # over every host serving the store together; None: no limit
    exec_prefix: str = ""
    env_vars: dict[str, str] = field(default_factory=dict)
    coalesce_params: list[int] = field(default_factory=list)
    blocking_params: list[int] = field(default_factory=list)
    timeout: float | None = None
    max_count: int = DEFAULT_MAX_COUNT
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    fsync: bool = True
    kind: str = "script"  # "script": one process per message; "worker": persistent workers
    worker_inflight: int = 1  # kind worker: messages one worker holds at once
    worker_restart_after: int = 0  # kind worker: messages before a worker is replaced (0: never)
    args: list[str] = field(default_factory=list)  # arguments after the script (isq's "cmd arg")
    message_arg: bool = False  # param1 as the script's last argument (isq's cmd "$line")
    fsq_dir: str = ""  # kind fsq: the fsq queue directory (ROOT/QUEUE) whose items are the messages
    fsq_ttl: int = 0  # kind fsq: items older than this many seconds go to fail/ untaken (0: never)
    http_ok: list[int] = field(default_factory=list)  # kind http: codes that mean done ([]: 200-299)
    http_per_host: int = 4  # kind http: requests in flight to one host:port at once
    http_verify: bool = True  # kind http: verify TLS certificates
    http_auth: dict[str, str] = field(default_factory=dict)  # kind http: {"user", "password_file"}
    http_allow: list[str] = field(default_factory=list)  # kind http: URL prefixes jobs may call ([]: any)

    @classmethod
    def from_dict(cls, data: Any) -> QueueConfig:
        if not isinstance(data, dict):
            raise InvalidConfig("a queue config must be a JSON object")
        known = set(cls.__dataclass_fields__)
        # RQ's legacy keys and never-implemented ones are accepted and ignored.
        ignored = {"coalesce", "coalesce_param1", "coalesce_param2", "coalesce_param3",
                   "coalesce_param4", "ordering", "schedule"}
        unknown = set(data) - known - ignored
        if unknown:
            raise InvalidConfig(f"unknown queue config key(s): {', '.join(sorted(unknown))}; the keys are "
                                f"{', '.join(cls.__dataclass_fields__)}")
        name = data.get("name")
        try:
            validate_queue_name(name)  # type: ignore[arg-type]
        except Exception as e:
            raise InvalidConfig(str(e)) from None
        assert isinstance(name, str)
        c = cls(name=name)
        script = data.get("script", "")
        if not isinstance(script, str) or "\0" in script:
            raise InvalidConfig("script must be a path string")
        c.script = script
        c.kind = str(data.get("kind", "script"))
        if c.kind not in QUEUE_KINDS:
            raise InvalidConfig(f"unknown queue kind {c.kind!r} (known: {', '.join(QUEUE_KINDS)})")
        if not c.script and c.kind != "http":
            raise InvalidConfig("script is required: the path of the program to run per message"
                                if c.kind == "script" else "script is required: the worker program")
        c.worker_inflight = _int_in(data.get("worker_inflight", 1), "worker_inflight", 1, 1000)
        c.worker_restart_after = _int_in(data.get("worker_restart_after", 0), "worker_restart_after", 0,
                                         1_000_000_000)
        nw = data.get("num_workers", 1)
        if isinstance(nw, str) and nw.strip().isdigit():
            nw = int(nw)  # RQ's configs hold it as a string
        if isinstance(nw, bool) or not isinstance(nw, int) or not 1 <= nw <= 128:
            raise InvalidConfig(f"num_workers must be an integer 1-128, got {nw!r}")
        c.num_workers = nw
        cw = data.get("cluster_workers")
        if cw is not None:
            if isinstance(cw, bool) or not isinstance(cw, int) or not 1 <= cw <= 100_000:
                raise InvalidConfig(f"cluster_workers must be an integer 1-100000 or null, got {cw!r}")
            c.cluster_workers = cw
        prefix = data.get("exec_prefix", "")
        if prefix is None:
            prefix = ""
        if not isinstance(prefix, str) or "\0" in prefix:
            raise InvalidConfig("exec_prefix must be a string")
        c.exec_prefix = prefix
        args = data.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) and "\0" not in a and _utf8(a) for a in args):
            raise InvalidConfig("args must be a list of strings (the script's arguments)")
        if len(args) > 256 or sum(len(a.encode()) for a in args) > MAX_ENV_VALUE:
            raise InvalidConfig("args: at most 256 arguments and 128 KiB")
        c.args = list(args)
        ma = data.get("message_arg", False)
        if not isinstance(ma, bool):
            raise InvalidConfig("message_arg must be true or false")
        if ma and c.kind != "script":
            raise InvalidConfig("message_arg needs kind script: a persistent worker gets messages on its pipe")
        c.message_arg = ma
        fd = data.get("fsq_dir") or ""
        if not isinstance(fd, str) or "\0" in fd or (fd and not os.path.isabs(fd)):
            raise InvalidConfig("fsq_dir must be an absolute path (the fsq queue directory, ROOT/QUEUE)")
        if c.kind == "fsq" and not fd:
            raise InvalidConfig("kind fsq needs fsq_dir: the fsq queue directory (ROOT/QUEUE) to serve")
        if fd and c.kind != "fsq":
            raise InvalidConfig("fsq_dir needs kind fsq")
        c.fsq_dir = os.path.normpath(fd) if fd else ""
        c.fsq_ttl = _int_in(data.get("fsq_ttl", 0), "fsq_ttl", 0, 10 * 365 * 86400)
        _http_keys(c, data)
        env = data.get("env_vars") or {}
        if not isinstance(env, dict):
            raise InvalidConfig("env_vars must be an object of NAME: value")
        if any(isinstance(v, str) and not _utf8(v) for v in env.values()):
            raise InvalidConfig("env_vars values must be valid Unicode text")
        for k, v in env.items():
            if not isinstance(k, str) or not ENV_NAME_RE.match(k):
                raise InvalidConfig(f"env_vars name {k!r} is not a valid environment variable name")
            if k.startswith("RQ_") or k.startswith("SPOOLQ_"):
                raise InvalidConfig(f"env_vars may not set {k}: RQ_* and SPOOLQ_* are set by spoolq")
            if not isinstance(v, (str, int, float)) or isinstance(v, bool) or "\0" in str(v):
                raise InvalidConfig(f"env_vars value for {k} must be a string")
            if len(str(v).encode()) > MAX_ENV_VALUE:
                raise InvalidConfig(f"env_vars value for {k} is over 128 KiB, more than Linux passes to a program")
        c.env_vars = {k: str(v) for k, v in env.items()}
        coalesce = data.get("coalesce_params")
        if coalesce is None and data.get("coalesce") in (True, "true", "yes", "1", 1):
            coalesce = [i for i in range(1, 5)
                        if data.get(f"coalesce_param{i}") in (True, "true", "yes", "1", 1)]
        c.coalesce_params = _param_numbers(coalesce, "coalesce_params")
        c.blocking_params = _param_numbers(data.get("blocking_params"), "blocking_params")
        t = data.get("timeout")
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise InvalidConfig("timeout must be a positive number of seconds, or null")
            c.timeout = float(t)
        mc = data.get("max_count", DEFAULT_MAX_COUNT)
        if isinstance(mc, bool) or not isinstance(mc, int) or not 1 <= mc <= 1_000_000:
            raise InvalidConfig("max_count must be an integer 1-1000000")
        c.max_count = mc
        c.retry = RetryPolicy.from_dict(data.get("retry"))
        fs = data.get("fsync", True)
        if not isinstance(fs, bool):
            raise InvalidConfig("fsync must be true or false")
        c.fsync = fs
        return c

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "script": self.script,
            "num_workers": self.num_workers,
            "cluster_workers": self.cluster_workers,
            "exec_prefix": self.exec_prefix,
            "env_vars": dict(self.env_vars),
            "coalesce_params": list(self.coalesce_params),
            "blocking_params": list(self.blocking_params),
            "timeout": self.timeout,
            "max_count": self.max_count,
            "retry": self.retry.to_dict(),
            "fsync": self.fsync,
            "kind": self.kind,
            "worker_inflight": self.worker_inflight,
            "worker_restart_after": self.worker_restart_after,
            **({"args": list(self.args)} if self.args else {}),
            **({"message_arg": True} if self.message_arg else {}),
            **({"fsq_dir": self.fsq_dir} if self.fsq_dir else {}),
            **({"fsq_ttl": self.fsq_ttl} if self.fsq_ttl else {}),
            **({"http_ok": list(self.http_ok), "http_per_host": self.http_per_host, "http_verify": self.http_verify,
                "http_auth": dict(self.http_auth), "http_allow": list(self.http_allow)}
               if self.kind == "http" else {}),
        }


QUEUE_KINDS = ("script", "worker", "fsq", "http")
HTTP_KEYS = ("http_ok", "http_per_host", "http_verify", "http_auth", "http_allow")


def _http_keys(c: QueueConfig, data: dict[str, Any]) -> None:
    """Kind http's keys (docs/http-jobs.md); refused on any other kind."""
    given = [k for k in HTTP_KEYS if k in data and data[k] not in (None, [], {}, "")]
    if c.kind != "http":
        # A config written back by to_dict() of a kind http queue turned script keeps defaults only.
        if any(k not in ("http_per_host", "http_verify") for k in given):
            raise InvalidConfig(f"{', '.join(given)} need kind http")
        return
    ok = data.get("http_ok") or []
    if not isinstance(ok, list) or not all(isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599
                                           for v in ok):
        raise InvalidConfig("http_ok must be a list of HTTP status codes 100-599 ([]: any 2xx)")
    c.http_ok = sorted(set(ok))
    c.http_per_host = _int_in(data.get("http_per_host", 4), "http_per_host", 1, 128)
    verify = data.get("http_verify", True)
    if not isinstance(verify, bool):
        raise InvalidConfig("http_verify must be true or false")
    c.http_verify = verify
    auth = data.get("http_auth") or {}
    if not isinstance(auth, dict) or set(auth) - {"user", "password_file"} or not all(
            isinstance(v, str) and "\0" not in v for v in auth.values()):
        raise InvalidConfig('http_auth must be {"user": NAME, "password_file": ABSOLUTE PATH}')
    if auth and (not auth.get("user") or ":" in auth["user"] or not os.path.isabs(auth.get("password_file", ""))):
        raise InvalidConfig('http_auth needs "user" (no colon) and "password_file" (an absolute path: the '
                            "password is read from that file, never from a message)")
    c.http_auth = dict(auth)
    allow = data.get("http_allow") or []
    if not isinstance(allow, list):
        raise InvalidConfig("http_allow must be a list of URL prefixes (http:// or https://)")
    from .httpjob import check_prefix  # here: httpjob imports this module
    for a in allow:
        try:
            check_prefix(a)
        except ValueError as e:
            raise InvalidConfig(str(e)) from None
    if auth and not allow:
        raise InvalidConfig("http_auth needs http_allow: the URL prefixes the queue's credentials may be sent "
                            "to (anyone who may send to the queue chooses the URL)")
    c.http_allow = list(allow)


def _int_in(v: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidConfig(f"{key} must be an integer {lo}-{hi}, got {v!r}")
    return v


@dataclass
class AttachmentInfo:
    """What the store records for an attachment: RQ's md5 and size, plus sha256."""

    name: str
    size: int
    md5: str
    sha256: str
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"md5": self.md5, "sha256": self.sha256, "size": self.size, "path": self.path}


def runner_host(runner: str | None) -> str:
    """The host in a runner record (``Store.heartbeat(runner="pid spawn_ns host")``)."""
    fields = (runner or "").split()
    return fields[2] if len(fields) > 2 else ""


@dataclass
class MessageView:
    """A message as read: the stored message plus derived state, status and attachments."""

    queue: str
    message: Message
    state: State
    job_status: str = ""
    attachments: dict[str, AttachmentInfo] = field(default_factory=dict)
    acked: bool = False
    host: str = ""  # in run: the host whose daemon runs it ("" when not known yet)

    @property
    def msg_id(self) -> str:
        return self.message.msg_id

    @property
    def status(self) -> str:
        """RQ's status text: ``state`` or ``"state - job_status"``."""
        return f"{self.state} - {self.job_status}" if self.job_status else str(self.state)

    def to_rq_json(self, full_id: str | None = None, *, local_paths: bool = True) -> dict[str, Any]:
        """The JSON RQ's ``get_message`` returns: msg fields plus ``state``, ``status``, ``_attachments``.

        ``local_paths=False`` (HTTP) gives each attachment's ``path`` relative to the spool
        root, like the message's own ``path``: a remote reader has no use for, and no business
        with, where the spool lives."""
        d = self.message.to_dict()
        d["history"] = list(self.message.history)
        d["state"] = str(self.state)
        d["status"] = self.status
        d["queue"] = self.queue
        day, hm, ss = bucket_of(self.message.msg_id)  # RQ's derived "path", relative to the root
        d["path"] = f"queue/{self.queue}/{self.state}/{day}/{hm}/{ss}/{'.' if self.acked else ''}{self.message.msg_id}"
        if full_id:
            d["full_msg_id"] = full_id
            # RQ: "the full id of the first message in a relay, dup or clone chain (input
            # value or own full id)"; an original's own id is filled in here, on read.
            d["orig_msg_id"] = d.get("orig_msg_id") or full_id
        if self.acked:
            d["acked"] = True
        if self.host:
            d["host"] = self.host
        if self.attachments:
            d["_attachments"] = {n: a.to_dict() for n, a in sorted(self.attachments.items())}
            if not local_paths:
                for n, a in d["_attachments"].items():
                    a["path"] = f"{d['path']}/attach/{n}"
        return d


@dataclass
class ListPage:
    """One page of a listing, newest first. ``next_cursor`` is None on the last page.

    A filtered listing examines at most ``scan_limit`` messages per call (when the caller
    sets one), so a page may hold fewer than ``limit`` items and still have a
    ``next_cursor``: the search goes on from there. ``scanned`` says how many were examined."""

    items: list[MessageView]
    next_cursor: str | None = None
    problems: list[str] = field(default_factory=list)
    scanned: int = 0


@dataclass
class IdPage:
    """Ids in one state that a filter matches, newest first (``Store.find_ids``)."""

    ids: list[str]
    next_cursor: str | None = None
    scanned: int = 0


SEARCHED_FIELDS = ("msg_id", "src", "dest", "param1", "param2", "param3", "param4", "orig_msg_id")


def search_text(data: dict[str, Any], job_status: str) -> str:
    """What a list filter searches, casefolded: the id, src, dest, param1..param4, every
    ``params`` entry as ``key=value`` (nested keys joined by dots), and the status text.
    Field names themselves are not searched, so ``m1`` does not match every ``param1``."""
    parts = [str(data.get(k) or "") for k in SEARCHED_FIELDS]

    def walk(v: Any, key: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{key}.{k}" if key else str(k))
        elif isinstance(v, list):
            for x in v:
                walk(x, key)
        else:
            parts.append(f"{key}={v}")

    params = data.get("params")
    if isinstance(params, dict):
        walk(params, "")
    parts.append(job_status)
    return "\n".join(parts).casefold()
