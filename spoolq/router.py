"""RQ's router rules (``config/rq_router_rules.rb``), parsed without evaluating any code.

RQ ``instance_eval``'d each line of the file as Ruby. spoolq reads the same line DSL with a
parser of its own (rq-spec 5.4; docs/decisions.md says where it is stricter)::

    rule "[odd_numbers]"                      # starts a rule; a blank line ends it
    src /^http:\\/\\/barrier\\d[13579]/         # regexes on the message's src / dest
    dest /\\/barrier_process_err$/i
    action :relay                             # :relay, :balance, :done or :err
    route ["a.example", "b.example"], ["c.example", "d.example"]
    delay 10                                  # seconds
    log true

    rule "default"                            # the rule for what nothing else matches
    action :err

An ``action`` may also be RQ's one conditional idiom,
``(ENV["NAME"] == "value" ? :relay : :done)`` (or ``!=``), read against the environment.
"""

from __future__ import annotations

import ast
import os
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACTIONS = ("relay", "balance", "done", "err")
DEFAULT = "default"


class RulesError(ValueError):
    """The rules file cannot be used: ``line`` says where (0: the file as a whole)."""

    def __init__(self, line: int, text: str, why: str) -> None:
        super().__init__(f"line {line}: {why}" + (f": [{text}]" if text else "") if line else why)
        self.line = line


@dataclass
class Rule:
    desc: str
    num: int = 0
    action: str | None = None
    src: re.Pattern[str] | None = None
    dest: re.Pattern[str] | None = None
    route: list[Any] = field(default_factory=list)  # hosts, or lists of hosts (one of each)
    delay: int = 0
    log: bool = False

    def match(self, msg: Mapping[str, Any]) -> bool:
        """RQ's ``Rule#match``: every pattern the rule has must find the message's field."""
        for pattern, key in ((self.src, "src"), (self.dest, "dest")):
            if pattern is None:
                continue
            value = msg.get(key)
            if not value or pattern.search(str(value)) is None:
                return False
        return True

    def select_hosts(self, rand: Callable[[int], int] | None = None) -> list[str]:
        """Where to send: ``relay`` goes to every host (one of each list in a list of lists),
        ``balance`` (and the others) to one host picked at random."""
        pick = rand or random.randrange
        if not self.route:
            return []
        if self.action == "relay":
            if isinstance(self.route[0], list):
                return [hosts[pick(len(hosts))] for hosts in self.route]
            return list(self.route)
        return [self.route[pick(len(self.route))]]

    def describe(self) -> str:
        """RQ's ``Rule#inspect``: the description, then ``field value`` lines."""
        lines = [self.desc]
        for name in ("action", "src", "dest", "route", "delay", "log"):
            v = getattr(self, name)
            if isinstance(v, re.Pattern):
                v = f"/{v.pattern}/"
            if v not in (None, [], 0, False):
                lines.append(f"{name} {v}")
        return "\n".join(lines) + "\n"


@dataclass
class RuleSet:
    rules: list[Rule]
    warnings: list[str] = field(default_factory=list)  # lines RQ ignored too

    def __len__(self) -> int:
        return len(self.rules)

    def first_match(self, msg: Mapping[str, Any]) -> Rule:
        """The first rule that matches (the default rule, last, matches everything)."""
        return next(r for r in self.rules if r.match(msg))


def txform_host(old: str, new: str) -> str:
    """RQ's ``txform_host``: send ``old`` (a full id or a queue name) to host ``new``: a full
    URL is used as is; a host without a port gets ``:3333``."""
    if new.startswith("http"):
        return new
    if not re.search(r":\d+", new):
        new += ":3333"
    if old.startswith("http"):
        return f"http://{new}/q/{old.split('/q/', 1)[1] if '/q/' in old else ''}"
    return f"http://{new}/q/{old}"


# -- parsing ---------------------------------------------------------------------------------
_CALL = re.compile(r"^\s*([a-z_]+)\s*(.*?)\s*$", re.S)
_RUBY_FLAGS = {"i": re.I, "m": re.S, "x": re.X}
_COND = re.compile(r"""^\(?\s*ENV\[\s*(["'])([A-Za-z_][A-Za-z0-9_]*)\1\s*\]\s*(==|!=)\s*(["'])(.*?)\4\s*\?\s*
                       :([a-z_]+)\s*:\s*:([a-z_]+)\s*\)?$""", re.X)


def _strip_comment(text: str) -> str:
    """``text`` without a trailing ``# comment`` (a ``#`` inside quotes or a regex stays)."""
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'/":
            quote = c
        elif c == "#":
            return text[:i].rstrip()
        i += 1
    return text


def _unparen(args: str) -> str:
    args = args.strip()
    if args.startswith("(") and args.endswith(")") and not _COND.match(args):
        return args[1:-1].strip()
    return args


def _string(args: str) -> str:
    v = _literal(args)
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {args!r}")
    return v


def _literal(args: str) -> Any:
    try:
        return ast.literal_eval(args)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"not a literal: {args!r}") from None


def _regex(args: str) -> re.Pattern[str]:
    m = re.fullmatch(r"/(.*)/([imx]*)", args, re.S)
    if m is None:
        raise ValueError(f"expected a /regex/, got {args!r}")
    flags = 0
    for f in m.group(2):
        flags |= _RUBY_FLAGS[f]
    body = m.group(1).replace("\\/", "/").replace("\\A", "^").replace("\\z", "$").replace("\\Z", "$")
    try:
        return re.compile(body, flags)
    except re.error as e:
        raise ValueError(f"bad regex {args}: {e}") from None


def _action(args: str, env: Mapping[str, str]) -> str:
    m = _COND.match(args)
    if m is not None:
        _, name, op, _, value, yes, no = m.groups()
        chosen = yes if (env.get(name) == value) == (op == "==") else no
    elif re.fullmatch(r":[a-z_]+", args):
        chosen = args[1:]
    else:
        raise ValueError(f"action must be one of :{', :'.join(ACTIONS)}, got {args!r}")
    if chosen not in ACTIONS:
        raise ValueError(f"action must be one of :{', :'.join(ACTIONS)}, got :{chosen}")
    return chosen


def _route(args: str) -> list[Any]:
    v = _literal(f"[{args}]")
    ok = all(isinstance(h, str) for h in v) or all(
        isinstance(hs, list) and hs and all(isinstance(h, str) for h in hs) for hs in v)
    if not v or not ok:
        raise ValueError(f"route takes host strings, or lists of host strings, got {args!r}")
    return list(v)


def _apply(rule: Rule, line: str, env: Mapping[str, str]) -> None:
    text = _strip_comment(line.rstrip("\n"))
    if not text.strip():
        return
    m = _CALL.match(text)
    if m is None:
        raise ValueError("not a rule statement")
    word, args = m.group(1), _unparen(m.group(2))
    if word == "rule":
        rule.desc = _string(args)
    elif word == "action":
        rule.action = _action(args, env)
    elif word in ("src", "dest"):
        setattr(rule, word, _regex(args))
    elif word == "route":
        rule.route = _route(args)
    elif word == "delay":
        if not re.fullmatch(r"\d+", args):
            raise ValueError(f"delay must be a whole number of seconds, got {args!r}")
        rule.delay = int(args)
    elif word == "log":
        if args not in ("true", "false"):
            raise ValueError(f"log must be true or false, got {args!r}")
        rule.log = args == "true"
    else:
        raise ValueError(f"unknown statement {word!r} (known: rule, action, src, dest, route, delay, log)")


def _end(rule: Rule, line: int) -> None:
    if rule.action in ("err",):
        rule.log = True  # RQ logs whatever it errs
    if rule.desc != DEFAULT and rule.src is None and rule.dest is None:
        raise RulesError(line, "", f"rule {rule.desc!r} must have a src or dest pattern")
    if rule.action is None:
        raise RulesError(line, "", f"rule {rule.desc!r} has no action")


def parse(text: str, env: Mapping[str, str] | None = None) -> RuleSet:
    """The rules of a rules file's ``text``; RulesError says what is wrong and where."""
    env = os.environ if env is None else env
    rules: list[Rule] = []
    warnings: list[str] = []
    cur: Rule | None = None
    start = 0
    for num, line in enumerate(text.splitlines(keepends=True), 1):
        if line in ("\n", "\r\n", ""):
            if cur is not None:
                _end(cur, start)
                cur = None
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.startswith("rule "):
            if cur is not None:
                _end(cur, start)
            cur, start = Rule(desc="", num=len(rules) + 1), num
            rules.append(cur)
        elif cur is None:
            if line.strip():  # ignored, as RQ ignores it (RQ's own test fixtures have one)
                warnings.append(f"line {num}: ignored, outside a rule: [{line.strip()}]")
            continue
        try:
            _apply(cur, line, env)
        except ValueError as e:
            raise RulesError(num, line.strip(), str(e)) from None
    if cur is not None:
        _end(cur, start)
    defaults = [r for r in rules if r.desc == DEFAULT]
    rules = [r for r in rules if r.desc != DEFAULT]
    rules.append(defaults[-1] if defaults else Rule(desc=DEFAULT, action="err", log=True))
    return RuleSet(rules, warnings)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> RuleSet:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(0, "", f"cannot read {path}: {e}") from None
    return parse(text, env)
