"""The metrics registry: every series the operations doc names, in Prometheus and OpenMetrics text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.limits import Limit
from gateway.metrics import (
    BACKENDS,
    ERROR_KINDS,
    LOGIN_RESULTS,
    REFRESH_OUTCOMES,
    UIDL_STORE_OPS,
    UPSTREAM_OPS,
    VERBS,
    Metrics,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"


def families(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    body, _ = metrics.render()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_every_documented_series_is_exposed_from_the_start() -> None:
    found = families(Metrics())
    for name in (
        "pop3_gateway_sessions_active",
        "pop3_gateway_sessions_total",
        "pop3_gateway_sessions_refused_total",
        "pop3_gateway_logins_total",
        "pop3_gateway_commands_total",
        "pop3_gateway_sent_bytes_total",
        "pop3_gateway_uidl_store_operations_total",
        "pop3_gateway_errors_total",
        "pop3_gateway_oauth2_refresh_total",
        "pop3_gateway_build_info",
        "process_open_fds",
    ):
        assert name in found, name
    assert {labels["result"] for labels, _ in found["pop3_gateway_logins_total"]} == set(LOGIN_RESULTS)
    assert {labels["verb"] for labels, _ in found["pop3_gateway_commands_total"]} == set(VERBS)
    assert {labels["kind"] for labels, _ in found["pop3_gateway_errors_total"]} == set(ERROR_KINDS)
    assert {labels["limit"] for labels, _ in found["pop3_gateway_sessions_refused_total"]} == {
        "total",
        "per-ip",
        "per-account",
        "unauthenticated",
    }
    assert found["pop3_gateway_build_info"] == [({"version": __version__}, 1.0)]
    assert all(v == 0 for _, v in found["pop3_gateway_logins_total"])


def test_sessions_active_and_total() -> None:
    m = Metrics(process=False)
    m.session_started()
    m.session_started()
    m.session_ended()
    assert m.sample("pop3_gateway_sessions_active") == 1
    assert m.sample("pop3_gateway_sessions_total") == 2
    m.session_refused(Limit.PER_IP)
    assert m.sample("pop3_gateway_sessions_refused_total", limit="per-ip") == 1
    assert m.sample("pop3_gateway_sessions_total") == 2


def test_logins_commands_octets_store_and_errors() -> None:
    m = Metrics(process=False)
    m.login("ok")
    m.login("auth")
    m.login("auth")
    m.command("retr")
    m.command(b"RETR")
    m.command("XYZZY")  # a client cannot create series
    m.command(b"\xff\xfe")
    m.sent(100)
    m.sent(23)
    m.uidl_store("read")
    m.error("upstream-timeout")
    assert m.sample("pop3_gateway_logins_total", result="auth") == 2
    assert m.sample("pop3_gateway_logins_total", result="ok") == 1
    assert m.sample("pop3_gateway_commands_total", verb="RETR") == 2
    assert m.sample("pop3_gateway_commands_total", verb="OTHER") == 2
    assert m.sample("pop3_gateway_commands_total", verb="XYZZY") is None
    assert m.sample("pop3_gateway_sent_bytes_total") == 123
    assert m.sample("pop3_gateway_uidl_store_operations_total", op="read") == 1
    assert m.sample("pop3_gateway_errors_total", kind="upstream-timeout") == 1


def test_label_values_outside_the_closed_sets_are_refused() -> None:
    m = Metrics(process=False)
    with pytest.raises(ValueError):
        m.login("maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        m.error("oops")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        m.uidl_store("drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        m.observe_upstream("pop3", "open", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        m.observe_upstream("imap", "sleep", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        m.sent(-1)


def test_upstream_latency_histogram_by_backend_and_op() -> None:
    now = [0.0]
    m = Metrics(clock=lambda: now[0], process=False)
    with m.time_upstream("imap", "open"):
        now[0] += 0.2
    with pytest.raises(RuntimeError), m.time_upstream("imap", "open"):
        now[0] += 40.0
        raise RuntimeError("a failing call is timed too")
    m.observe_upstream("maildir", "fetch", 0.003)
    assert m.sample("pop3_gateway_upstream_duration_seconds_count", backend="imap", op="open") == 2
    assert m.sample("pop3_gateway_upstream_duration_seconds_sum", backend="imap", op="open") == pytest.approx(
        40.2
    )
    bucket = "pop3_gateway_upstream_duration_seconds_bucket"
    assert m.sample(bucket, backend="imap", op="open", le="0.25") == 1
    assert m.sample(bucket, backend="imap", op="open", le="60.0") == 2
    assert m.sample(bucket, backend="maildir", op="fetch", le="0.005") == 1


def test_render_speaks_prometheus_text_and_openmetrics_on_request() -> None:
    m = Metrics(process=False)
    m.login("ok")
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    assert b'pop3_gateway_logins_total{result="ok"} 1.0' in body
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(process=False), Metrics(process=False)
    a.login("ok")
    assert b.sample("pop3_gateway_logins_total", result="ok") == 0
    assert a.registry is not b.registry


def test_no_created_series_in_either_exposition() -> None:
    m = Metrics()
    m.login("ok")
    m.observe_upstream("imap", "open", 0.1)
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        body, _ = m.render(accept)
        assert b"_created" not in body, accept
        assert b'pop3_gateway_logins_total{result="ok"} 1.0' in body
        assert b"pop3_gateway_upstream_duration_seconds_count" in body
    assert m.sample("pop3_gateway_logins_total", result="ok") == 1  # the registry itself is untouched


def documented_label_values() -> dict[tuple[str, str], set[str]]:
    """From the metrics table of docs/operations.md: (metric, label) -> the values it lists."""
    out: dict[tuple[str, str], set[str]] = {}
    for line in (DOCS / "operations.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not (name := re.fullmatch(r"`(pop3_gateway_[a-z0-9_]+)`", cells[0])):
            continue
        for part in filter(None, (p.strip() for p in cells[2].split(";"))):
            label, _, values = part.partition(":")
            words = {v.strip().strip("`") for v in values.split(",") if v.strip()}
            out[(name.group(1), label.strip().strip("`"))] = words
    return out


def test_the_operations_doc_lists_every_label_value_the_code_can_emit() -> None:
    expected = {
        ("pop3_gateway_sessions_refused_total", "limit"): {limit.value for limit in Limit},
        ("pop3_gateway_logins_total", "result"): set(LOGIN_RESULTS),
        ("pop3_gateway_commands_total", "verb"): set(VERBS),
        ("pop3_gateway_upstream_duration_seconds", "backend"): set(BACKENDS),
        ("pop3_gateway_upstream_duration_seconds", "op"): set(UPSTREAM_OPS),
        ("pop3_gateway_uidl_store_operations_total", "op"): set(UIDL_STORE_OPS),
        ("pop3_gateway_errors_total", "kind"): set(ERROR_KINDS),
        ("pop3_gateway_oauth2_refresh_total", "outcome"): set(REFRESH_OUTCOMES),
        ("pop3_gateway_build_info", "version"): set(),  # the package version: no closed set
    }
    assert documented_label_values() == expected


def test_every_closed_label_value_is_one_the_code_emits() -> None:
    """No label value is listed (and exposed at 0 from the start) that nothing can ever count: each value of
    the login result, upstream op, UIDL store op and error kind sets appears as a string literal in the
    gateway's code outside gateway/metrics.py."""
    import ast
    import typing
    from pathlib import Path

    from gateway import metrics

    root = Path(metrics.__file__).parent
    literals: set[str] = set()
    for path in root.rglob("*.py"):
        if path.name == "metrics.py":
            continue
        tree = ast.parse(path.read_text())
        in_types = {  # the values a Literal[...] type lists are no emission
            id(c)
            for sub in ast.walk(tree)
            if isinstance(sub, ast.Subscript) and getattr(sub.value, "id", None) == "Literal"
            for c in ast.walk(sub.slice)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_types:
                literals.add(node.value)
    never = {
        name: sorted(set(typing.get_args(getattr(metrics, name))) - literals)
        for name in ("LoginResult", "UpstreamOp", "UidlStoreOp", "ErrorKind", "RefreshOutcome")
    }
    assert {name: values for name, values in never.items() if values} == {}
