"""RQ's router rules (spoolq/router.py): RQ's own rule-processor tests, ported, on RQ's own
fixture files (read from RQ's tree, never copied here), what spoolq refuses that RQ let
through, and ``spoolq rq verify_rules``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_rq_setup import rq_tree

from spoolq import router

RQ = rq_tree()
needs_rq = pytest.mark.skipif(RQ is None, reason="RQ's tree is not here (set SPOOLQ_PEERS to the peers' folder)")


def fixture(name: str) -> Path:
    assert RQ is not None
    return RQ / "test" / "fixtures" / name


def good() -> router.RuleSet:
    return router.load(fixture("good_rules.rb"), env={})


def attrs(r: router.Rule) -> tuple[Any, ...]:
    return (r.desc, r.src.pattern if r.src else None, r.dest.pattern if r.dest else None, r.action, r.route,
            r.log, r.delay)


@needs_rq
def test_rq_good_rules_read_as_rq_reads_them() -> None:
    rs = good()
    assert len(rs) == 6
    assert [attrs(r) for r in rs.rules] == [
        ("[mirror_processing_of_errors_with_delay]", None, r"/barrier_process_err$", "relay",
         ["brxlog-be-halb01.btrll.com", "stats.btrll.com"], False, 10),
        ("[even_numbers_relay_host0]", r"^http://barrier\d[02468]\.btrll\.com:3333", None, "done",
         ["host0.btrll.com"], True, 0),
        ("[odd_numbers_relay_host1]", r"^http://barrier\d[13579]\.btrll\.com:3333", None, "relay",
         [["brxlog-be-halb01.btrll.com", "brxlog-be-halb02.btrll.com"], ["stats1.btrll.com", "stats2.btrll.com"]],
         False, 0),
        ("[traffic_relay_host1]", "^checkin_v1$", r"^http://barrier\d[13579]\.btrll\.com:3333", "balance",
         ["brxlog-be-halb01.btrll.com", "stats.btrll.com"], False, 0),
        ("[old_data_center_route]", None, r"^http://host\.btrll\.com:3333", "relay",
         ["http://host1.btrll.com:3333/q/foobar"], True, 0),
        ("default", None, None, "err", [], True, 0),
    ]
    # RQ's one conditional: the action of rule 2 follows the environment.
    assert router.load(fixture("good_rules.rb"), env={"BR_ENV": "prod"}).rules[1].action == "relay"


@needs_rq
@pytest.mark.parametrize("num,msg,expected", [
    (0, {"dest": "http://xyz.abc.com/barrier_process_err"}, True),
    (0, {"dest": "http://xyz.abc.com/barrier_process_err2"}, False),
    (0, {"dest": "http://rpt03.btrll.com/flarby"}, False),
    (1, {"src": "http://barrier00.btrll.com:3333/abc"}, True),
    (1, {"src": "http://barrier02.btrll.com:3333/a"}, True),
    (1, {"src": "http://barrier1.btrll.com:3333/a"}, False),
    (1, {"src": "http://barrier2.btrll.com:3333/a"}, False),
    (2, {"src": "http://barrier03.btrll.com:3333/a"}, True),
    (2, {"src": "http://barrier02.btrll.com:3333/a"}, False),
    (3, {"dest": "http://barrier03.btrll.com:3333/a", "src": "checkin_v1"}, True),
    (3, {"dest": "http://barrier02.btrll.com:3333/a", "src": "checkin_v2"}, False),
    (3, {"dest": "http://barrier01.btrll.com:3333/a", "src": "checkin_v2"}, False),
    (3, {"src": "checkin_v1"}, False),
    (3, {"dest": "http://barrier1.btrll.com:3333/a"}, False),
    (4, {"dest": "http://host.btrll.com:3333/old_rq_route"}, True),
    (4, {"dest": "http://host1.btrll.com:3333/"}, False),
    (5, {"dest": "http://barrier0.btrll.com:3333/a"}, True),
    (5, {}, True),
    (5, {"src": "blahblah"}, True),
])
def test_rq_rule_matches(num: int, msg: dict[str, str], expected: bool) -> None:
    assert good().rules[num].match(msg) is expected


@needs_rq
def test_rq_first_match_host_selection_and_transform() -> None:
    rs = good()
    for msg, num in (({"dest": "http://m0.btrll.com/barrier_process_err"}, 0),
                     ({"src": "http://barrier08.btrll.com:3333/render"}, 1),
                     ({"src": "http://barrier05.btrll.com:3333/render"}, 2),
                     ({"dest": "http://barrier05.btrll.com:3333/render", "src": "checkin_v1"}, 3),
                     ({"dest": "http://host.btrll.com:3333/render"}, 4),
                     ({"dest": "http://x5.btrll.com:3333/review", "src": "qa01"}, 5)):
        assert rs.first_match(msg) is rs.rules[num]

    def always(k: int) -> Callable[[int], int]:
        return lambda n: k

    assert rs.rules[0].select_hosts(always(0)) == ["brxlog-be-halb01.btrll.com", "stats.btrll.com"]
    assert rs.rules[1].select_hosts(always(0)) == ["host0.btrll.com"]
    assert rs.rules[2].select_hosts(always(1)) == ["brxlog-be-halb02.btrll.com", "stats2.btrll.com"]
    assert rs.rules[3].select_hosts(always(1)) == ["stats.btrll.com"]
    assert rs.rules[4].select_hosts(always(0)) == ["http://host1.btrll.com:3333/q/foobar"]
    assert rs.rules[5].select_hosts(always(0)) == []
    nd = router.load(fixture("good_no_default_rules.rb"), env={})
    assert len(nd) == 2 and (nd.rules[1].desc, nd.rules[1].action, nd.rules[1].log) == ("default", "err", True)
    rule = nd.first_match({"dest": "http://m0.btrll.com/q/old_queue_name"})
    assert rule is nd.rules[0]
    assert router.txform_host("http://m0.btrll.com/q/old_queue_name", rule.route[0]) == \
        "http://mc34.btrll.com:3333/q/new_queue_name"


@pytest.mark.parametrize("old,new,expected", [
    ("http://oldhost.btrll.com:3333/q/box_que", "brxlog-be-halb02.btrll.com", "http://brxlog-be-halb02.btrll.com:3333/q/box_que"),
    ("http://oldhost.btrll.com/q/box_que", "brxlog-be-halb02.btrll.com", "http://brxlog-be-halb02.btrll.com:3333/q/box_que"),
    ("http://oldhost.btrll.com/q/box_que", "brxlog-be-halb02.btrll.com:2222", "http://brxlog-be-halb02.btrll.com:2222/q/box_que"),
    ("http://oldhost.btrll.com:3333/q/box_que", "stats2.btrll.com", "http://stats2.btrll.com:3333/q/box_que"),
    ("ftp_cleaner", "stats2.btrll.com", "http://stats2.btrll.com:3333/q/ftp_cleaner"),
    ("ftp_cleaner", "http://host1.btrll.com:3333/q/foobar", "http://host1.btrll.com:3333/q/foobar"),
    ("http://oldhost.btrll.com:3333/q/box_que", "http://host1.btrll.com:3333/q/foobar",
     "http://host1.btrll.com:3333/q/foobar"),
])
def test_rq_host_transform(old: str, new: str, expected: str) -> None:
    assert router.txform_host(old, new) == expected


@needs_rq
def test_rq_bad_rules_and_a_missing_file_are_refused() -> None:
    with pytest.raises(router.RulesError, match="line 9"):
        router.load(fixture("bad_rules.rb"), env={})
    with pytest.raises(router.RulesError, match="cannot read"):
        router.load(fixture("non_existant_rules.rb"), env={})


@pytest.mark.parametrize("text,why", [
    ('rule "a"\nsrc /x/\naction :bogus\n', "action must be one of"),  # RQ swallowed this one
    ('rule "a"\nsrc /x/\n', "has no action"),
    ('rule "a"\naction :done\n', "must have a src or dest"),  # RQ let a last rule skip this check
    ('rule "a"\nsrc /x/\naction :done\ndelay "5"\n', "delay must be"),
    ('rule "a"\nsrc /x/\naction :done\nlog TRUE\n', "log must be"),
    ('rule "a"\nsrc /(/\naction :done\n', "bad regex"),
    ('rule "a"\nsrc /x/\naction :done\nsystem("rm -rf /")\n', "unknown statement"),
    ('rule "a"\nsrc /x/\naction :done\nroute `id`\n', "not a literal"),
    ('rule "a"\nsrc /x/\naction :done\nroute __import__("os")\n', "not a literal"),
    ('rule "a"\nsrc /x/\naction :relay\nroute [1, 2]\n', "route takes host strings"),
])
def test_what_is_refused(text: str, why: str) -> None:
    with pytest.raises(router.RulesError, match=why):
        router.parse(text, env={})


def test_comments_flags_and_a_last_rule_without_a_blank_line() -> None:
    rs = router.parse('# routes\nrule "x" # the x rule\ndest /^HTTP:\\/\\/a\\.b/i  # case-blind\n'
                      'action :balance\nroute "h1", "h2"\nrule "default"\naction :done', env={})
    assert [r.desc for r in rs.rules] == ["x", "default"]
    assert rs.first_match({"dest": "http://a.b/q/z"}).desc == "x"
    assert rs.first_match({"dest": "http://c/q/z"}).action == "done"


def test_verify_rules_command(cli: Any, tmp_path: Path) -> None:
    ok = tmp_path / "rules.rb"
    ok.write_text('rule "x"\nsrc /a/\naction :done\n')
    r = cli("rq", "verify_rules", "--path", str(ok))
    assert (r.returncode, r.stdout) == (0, "ok\n")
    r = cli("rq", "verify_rules", "--path", str(ok), "--verbose")
    assert r.returncode == 0 and "x\naction done\nsrc /a/\n" in r.stdout and r.stdout.endswith("ok\n")
    bad = tmp_path / "bad.rb"
    bad.write_text('rule "x"\nsrc /a/\naction :explode\n')
    r = cli("rq", "verify_rules", "--path", str(bad))
    assert (r.returncode, r.stdout) == (1, "fail bad router rules file\n")
    r = cli("rq", "verify_rules", "--path", str(bad), "--verbose")
    assert r.returncode == 1 and "line 3" in r.stdout
    r = cli("rq", "verify_rules")
    assert (r.returncode, r.stdout) == (1, "fail missing argument: --path\n")
