"""deploy/prometheus-alerts.yml and deploy/grafana-dashboard.json name only metrics (and
labels) a real ``grpcbridge serve`` (one process, and a supervisor with ``--workers 2``)
exports on its /metrics.

Every PromQL expression of both files is reduced to the series it selects (strings, range
selectors, grouping clauses and function calls removed); each series name must be a sample
name of the bridge's exposition (parsed with prometheus_client: ``_total`` of counters,
``_bucket``/``_count``/``_sum`` of histograms, gauges as they are), and each label matched
on must be one the series has (or ``instance``/``job``, which Prometheus adds). The bridge
first serves a tunnel whose backend is down and refuses a request, so that labelled series
(close codes, dial failures, refusal reasons) exist."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets.asyncio.client
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus

from support import Metrics, cli, eventually, http_get, timing

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up": set()}
#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_LABEL_VALUES = re.compile(r"\blabel_values\s*\(\s*([^,()]+?)\s*,\s*(\w+)\s*\)")
_NAME = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan"}


def series_in(expr: str) -> dict[str, set[str]]:
    """The series ``expr`` selects: name -> label names it matches on."""
    # Grafana's label_values(series, label) -> series{label=""}
    text = _LABEL_VALUES.sub(lambda m: f'{m[1]}{{{m[2]}=""}}', expr)
    text = _STRING.sub('""', text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    found: dict[str, set[str]] = {}
    for name, braces, call in _NAME.findall(text):
        if call or name.lower() in _KEYWORDS:
            continue  # a function or aggregation, or an operator
        found.setdefault(name, set()).update(_MATCHER.findall(braces))
    return found


def alert_expressions() -> list[str]:
    document = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def dashboard_expressions() -> list[str]:
    """Every query of the dashboard: panel targets and template variable queries."""
    document = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    expressions = [node["expr"] for node in _walk(document) if isinstance(node.get("expr"), str)]
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            expressions.append(query["query"] if isinstance(query, dict) else query)
    return expressions


def unknown(expressions: list[str], exported: dict[str, set[str]]) -> list[str]:
    """What the expressions name that ``exported`` (series name -> label names) lacks."""
    problems = []
    for expr in expressions:
        for name, labels in series_in(expr).items():
            if name not in exported:
                problems.append(f"{name} (in {expr!r}) is not exported")
            elif missing := labels - exported[name] - TARGET_LABELS:
                problems.append(f"{name} has no label {sorted(missing)} (in {expr!r}); it has "
                                f"{sorted(exported[name])}")
    return problems


@pytest.fixture(scope="module")
def expressions() -> dict[str, list[str]]:
    found = {"prometheus-alerts.yml": alert_expressions(),
             "grafana-dashboard.json": dashboard_expressions()}
    for name, values in found.items():
        assert len(values) >= 8, f"{name}: only {values}"
    return found


async def _exported(workers: int) -> dict[str, set[str]]:
    """Series name -> label names, from a ``grpcbridge serve`` after one tunnel (backend
    down: a dial failure and a 1011 close) and one refusal (wrong path)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with cli(["serve", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{closed_port}",
              "--metrics-listen", "127.0.0.1:0", "--workers", str(workers)]) as bridge:
        metrics = Metrics(bridge)
        connect = websockets.asyncio.client.connect
        async with connect(bridge.url, open_timeout=timing(10)) as ws:
            with contextlib.suppress(ConnectionClosed):
                await ws.recv()
        with pytest.raises(InvalidStatus):
            async with connect(bridge.url + "/elsewhere", open_timeout=timing(10)):
                pass
        await metrics.settled(tunnels=1)
        text = ""

        async def counted() -> bool:
            nonlocal text
            text = await http_get(metrics.host, metrics.port, "/metrics")
            return "grpcbridge_upgrades_rejected_total{" in text

        await eventually(counted, 10)
    exported: dict[str, set[str]] = {name: set(labels)
                                     for name, labels in PROMETHEUS_SERIES.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


async def test_deploy_files_name_only_exported_metrics(
        expressions: dict[str, list[str]], leak_check: None) -> None:
    # One bridge process, and a supervisor with workers (it adds the worker metrics).
    exported = await _exported(workers=1)
    for name, labels in (await _exported(workers=2)).items():
        exported.setdefault(name, set()).update(labels)
    # The series the rules depend on are really there, labelled as the rules expect.
    assert exported["grpcbridge_tunnels_closed_total"] == {"code"}
    assert exported["grpcbridge_backend_dial_failures_total"] == {"reason"}
    assert "grpcbridge_worker_restarts_total" in exported
    for name, values in expressions.items():
        assert not unknown(values, exported), f"{name}: {unknown(values, exported)}"


def test_the_check_catches_a_misnamed_metric_or_label(
        expressions: dict[str, list[str]]) -> None:
    exported = {"grpcbridge_bytes_total": {"direction"}, "up": set()}
    assert series_in('sum by (instance) (rate(grpcbridge_bytes_total{direction="x"}[5m])) '
                     '/ on(instance) up offset 1h > bool 1e3') == {
        "grpcbridge_bytes_total": {"direction"}, "up": set()}
    assert unknown(['rate(grpcbridge_bytes_total{direction!~"a|b"}[$__rate_interval])'],
                   exported) == []
    assert unknown(["rate(grpcbridge_byte_total[5m])"], exported) == [
        "grpcbridge_byte_total (in 'rate(grpcbridge_byte_total[5m])') is not exported"]
    assert len(unknown(['grpcbridge_bytes_total{way="up"}'], exported)) == 1
    assert unknown(["label_values(grpcbridge_bytes_total, job)"], exported) == []
    assert len(unknown(["label_values(grpcbridge_bytes_total, pod)"], exported)) == 1
    # Each deploy file names the bridge's metrics at all (a parser that found nothing
    # would pass every file).
    for name, values in expressions.items():
        named = {series for expr in values for series in series_in(expr)}
        assert {"grpcbridge_tunnels_active", "grpcbridge_tunnels_closed_total",
                "grpcbridge_backend_dial_failures_total"} <= named, (name, named)
