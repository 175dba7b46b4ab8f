"""deploy/prometheus-alerts.yml and deploy/grafana-dashboard.json name only metrics, labels
and label values a real ``grpcbridge serve`` (one process, and a supervisor with
``--workers 2``) exports on its /metrics.

Every PromQL expression of both files is reduced to the series it selects (strings, range
selectors, grouping clauses and function calls removed); each series name must be a sample
name of the bridge's exposition (parsed with prometheus_client: ``_total`` of counters,
``_bucket``/``_count``/``_sum`` of histograms, gauges as they are), and each label matched
on must be one the series has (or ``instance``/``job``, which Prometheus adds). Labels an
aggregation groups ``by`` must be on every series it aggregates; labels the alerts'
annotations (``{{ $labels.x }}``) and the dashboard's legends (``{{x}}``) show must survive
the expression's aggregations. Values matched on (``reason="memory"``, ``code=~"..."``) must
be values the bridge produces, from its source: the rejection reasons, the dial failure
reasons, the byte directions, the close codes (grpcbridge's own and those a peer may send).
The bridge first serves a tunnel whose backend is down and refuses a request; its labelled
counters exist from the start, each known label value at 0."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets.asyncio.client
import websockets.frames
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus

import grpcbridge
from grpcbridge.core.admission import Rejection
from grpcbridge.core.stream import CloseCode
from grpcbridge.observability import (
    DIAL_FAILURE_REASONS,
    DIRECTIONS,
    PRESET_CLOSE_CODES,
    REJECTION_REASONS,
)

from support import Metrics, cli, eventually, free_port, http_get, timing

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SOURCE = Path(grpcbridge.__file__).resolve().parent
#: Series Prometheus makes itself for every target.
PROMETHEUS_SERIES: dict[str, set[str]] = {"up": set()}
#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}

#: Close codes a tunnel can end with: grpcbridge's own, 1005 (a close frame without a code),
#: and any a peer may send (RFC 6455 7.4: the registered ones and 3000-4999).
CLOSE_CODES = ({int(code) for code in CloseCode} | {1005}
               | {int(code) for code in websockets.frames.EXTERNAL_CLOSE_CODES}
               | set(range(3000, 5000)))
#: The values each labelled series of the bridge can carry, per (series, label).
LABEL_VALUES: dict[tuple[str, str], set[str]] = {
    ("grpcbridge_upgrades_rejected_total", "reason"): set(REJECTION_REASONS),
    ("grpcbridge_backend_dial_failures_total", "reason"): set(DIAL_FAILURE_REASONS),
    ("grpcbridge_bytes_total", "direction"): set(DIRECTIONS),
    ("grpcbridge_tunnels_closed_total", "code"): {str(code) for code in CLOSE_CODES},
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_LABEL_VALUES = re.compile(r"\blabel_values\s*\(\s*([^,()]+?)\s*,\s*(\w+)\s*\)")
_NAME = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan"}
_SELECTOR = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_VALUE_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_BY = re.compile(r"\bby\s*\(([^)]*)\)\s*\(")
_AGGREGATION = re.compile(r"\b(?:sum|avg|min|max|count|stddev|stdvar|group|topk|bottomk"
                          r"|quantile|count_values)\s*\(")
_ALERT_LABEL = re.compile(r"\$labels\.(\w+)")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


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


def _argument(text: str, start: int) -> str:
    """The text inside the parenthesis opened just before ``start``."""
    depth = 1
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    raise ValueError(f"unbalanced parentheses in {text!r}")


def groupings(expr: str) -> list[tuple[set[str], str]]:
    """Every ``agg by (labels) (argument)`` of ``expr``: (labels, argument)."""
    return [({label.strip() for label in match[1].split(",") if label.strip()},
             _argument(expr, match.end())) for match in _BY.finditer(expr)]


def result_labels(expr: str, exported: dict[str, set[str]]) -> set[str]:
    """Labels every result of ``expr`` has (at most): those of all its ``by`` clauses, none
    after an aggregation without one, else those of every series it selects."""
    clauses = groupings(expr)
    if clauses:
        return set.intersection(*(labels for labels, _ in clauses))
    if _AGGREGATION.search(_STRING.sub('""', expr)):
        return set()
    series = series_in(expr)
    return set.intersection(*(exported.get(name, set()) | TARGET_LABELS for name in series))


def values_in(expr: str) -> list[tuple[str, str, str, str]]:
    """Every label matcher with a value: (series, label, operator, value)."""
    return [(name, label, operator, value.replace('\\"', '"').replace("\\\\", "\\"))
            for name, braces in _SELECTOR.findall(expr)
            for label, operator, value in _VALUE_MATCHER.findall(braces)]


def impossible_values(expr: str) -> list[str]:
    """Matchers of ``expr`` on a value (or regex alternative) the bridge never produces."""
    problems = []
    for name, label, operator, value in values_in(expr):
        if label in TARGET_LABELS:
            continue
        known = LABEL_VALUES.get((name, label))
        if known is None:
            problems.append(f"{name}{{{label}}}: no known values (in {expr!r})")
            continue
        alternatives = value.split("|") if "~" in operator else [value]
        for alternative in alternatives:
            if not any(re.fullmatch(alternative if "~" in operator else re.escape(alternative),
                                    candidate) for candidate in known):
                problems.append(f"{name}{{{label}{operator}{value!r}}}: {alternative!r} is "
                                f"not a value it has (in {expr!r})")
    return problems


def unknown(expressions: list[str], exported: dict[str, set[str]],
            templates: dict[str, set[str]] | None = None) -> list[str]:
    """What the expressions name that ``exported`` (series name -> label names) lacks;
    ``templates``: expression -> labels its alert annotations or legend show."""
    problems = []
    for expr in expressions:
        for name, labels in series_in(expr).items():
            if name not in exported:
                problems.append(f"{name} (in {expr!r}) is not exported")
            elif missing := labels - exported[name] - TARGET_LABELS:
                problems.append(f"{name} has no label {sorted(missing)} (in {expr!r}); it has "
                                f"{sorted(exported[name])}")
        for labels, argument in groupings(expr):
            for name in series_in(argument):
                if name in exported and (missing := labels - exported[name] - TARGET_LABELS):
                    problems.append(f"grouping by {sorted(missing)}, which {name} has not "
                                    f"(in {expr!r})")
        problems += impossible_values(expr)
        if missing := (templates or {}).get(expr, set()) - result_labels(expr, exported):
            problems.append(f"the result of {expr!r} has no label {sorted(missing)} to show")
    return problems


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_expressions() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def alert_templates() -> dict[str, set[str]]:
    """Alert expression -> the labels its annotations show."""
    return {rule["expr"]: set(_ALERT_LABEL.findall(json.dumps(rule.get("annotations", {}))))
            for rule in alert_rules()}


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _dashboard() -> Any:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def dashboard_expressions() -> list[str]:
    """Every query of the dashboard: panel targets and template variable queries."""
    document = _dashboard()
    expressions = [node["expr"] for node in _walk(document) if isinstance(node.get("expr"), str)]
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            expressions.append(query["query"] if isinstance(query, dict) else query)
    return expressions


def dashboard_templates() -> dict[str, set[str]]:
    """Panel target expression -> the labels its legend shows."""
    found: dict[str, set[str]] = {}
    for node in _walk(_dashboard()):
        if isinstance(node.get("expr"), str):
            legend = str(node.get("legendFormat", ""))
            found.setdefault(node["expr"], set()).update(_LEGEND_LABEL.findall(legend))
    return found


@pytest.fixture(scope="module")
def expressions() -> dict[str, list[str]]:
    found = {"prometheus-alerts.yml": alert_expressions(),
             "grafana-dashboard.json": dashboard_expressions()}
    for name, values in found.items():
        assert len(values) >= 8, f"{name}: only {values}"
    return found


#: A series' label values in an exposition: (series name, label) -> values.
Values = dict[tuple[str, str], set[str]]


async def _exported(workers: int) -> tuple[dict[str, set[str]], Values]:
    """Series name -> label names, and the label values, from a ``grpcbridge serve`` after
    one tunnel (backend down: a dial failure and a 1011 close) and one refusal (wrong
    path)."""
    closed_port = free_port()
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
            status, _headers, body = await http_get(metrics.port, "/metrics", host=metrics.host)
            assert status == 200, (status, body)
            text = body.decode()
            return 'grpcbridge_upgrades_rejected_total{reason="path"} 1.0' in text

        await eventually(counted, 10)
    exported: dict[str, set[str]] = {name: set(labels)
                                     for name, labels in PROMETHEUS_SERIES.items()}
    values: Values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
            for label, value in sample.labels.items():
                values.setdefault((sample.name, label), set()).add(value)
    return exported, values


async def test_deploy_files_name_only_exported_metrics(
        expressions: dict[str, list[str]], leak_check: None) -> None:
    # One bridge process, and a supervisor with workers (it adds the worker metrics).
    exported, values = await _exported(workers=1)
    workers_exported, workers_values = await _exported(workers=2)
    for name, labels in workers_exported.items():
        exported.setdefault(name, set()).update(labels)
    # The series the rules depend on are really there, labelled as the rules expect.
    assert exported["grpcbridge_tunnels_closed_total"] == {"code"}
    assert exported["grpcbridge_backend_dial_failures_total"] == {"reason"}
    assert "grpcbridge_worker_restarts_total" in exported
    # Every known label value exists from the start (at 0 until it happens), in a single
    # process and summed over workers, so increase() sees the first event after a start.
    for found in (values, workers_values):
        for key, known in LABEL_VALUES.items():
            preset = ({str(code) for code in PRESET_CLOSE_CODES}
                      if key[1] == "code" else known)
            assert preset <= found[key], (key, found[key])
    templates = {"prometheus-alerts.yml": alert_templates(),
                 "grafana-dashboard.json": dashboard_templates()}
    for name, expressions_of in expressions.items():
        problems = unknown(expressions_of, exported, templates[name])
        assert not problems, f"{name}: {problems}"


def test_the_known_label_values_are_the_sources() -> None:
    # Every refusal the bridge labels (Rejection(..., label="x") in its source, and the
    # default label of a hook's Rejection) is a known rejection reason.
    labels = {match for path in SOURCE.rglob("*.py")
              for match in re.findall(r'\blabel="(\w+)"', path.read_text())}
    labels.add(Rejection(403, "x").label)
    assert labels == set(REJECTION_REASONS)
    assert {"timeout", "refused", "error"} == set(DIAL_FAILURE_REASONS)
    assert {"1000", "1011", "1005", "4000", "1012"} <= LABEL_VALUES[
        ("grpcbridge_tunnels_closed_total", "code")]


def test_the_check_catches_a_misnamed_metric_label_or_value(
        expressions: dict[str, list[str]]) -> None:
    exported = {"grpcbridge_bytes_total": {"direction"}, "up": set(),
                "grpcbridge_tunnels_closed_total": {"code"},
                "grpcbridge_upgrades_rejected_total": {"reason"},
                "grpcbridge_tunnels_active": set()}
    assert series_in('sum by (instance) (rate(grpcbridge_bytes_total{direction="x"}[5m])) '
                     '/ on(instance) up offset 1h > bool 1e3') == {
        "grpcbridge_bytes_total": {"direction"}, "up": set()}
    assert unknown(['rate(grpcbridge_bytes_total{direction!~"client_to_backend|backend_to_'
                    'client"}[$__rate_interval])'], exported) == []
    assert unknown(["rate(grpcbridge_byte_total[5m])"], exported) == [
        "grpcbridge_byte_total (in 'rate(grpcbridge_byte_total[5m])') is not exported"]
    assert len(unknown(['grpcbridge_bytes_total{way="up"}'], exported)) == 2  # no label/values
    assert unknown(["label_values(grpcbridge_bytes_total, job)"], exported) == []
    assert len(unknown(["label_values(grpcbridge_bytes_total, pod)"], exported)) == 1
    # Values the bridge never produces: an invalid close code, a misspelt reason (also as
    # a regex alternative), a direction that does not exist.
    for wrong in ['increase(grpcbridge_tunnels_closed_total{code="1101"}[5m])',
                  'grpcbridge_upgrades_rejected_total{reason=~"capacty"}',
                  'grpcbridge_upgrades_rejected_total{reason=~"capacity|client_conections"}',
                  'grpcbridge_upgrades_rejected_total{reason!="mem"}',
                  'grpcbridge_bytes_total{direction="up"}']:
        assert len(unknown([wrong], exported)) == 1, wrong
    assert unknown(['grpcbridge_tunnels_closed_total{code=~"10(08|11)|4[0-9]{3}"}'],
                   exported) == []
    # Grouping by a label the aggregated series lacks; showing one the result lacks.
    assert len(unknown(["sum by (instance, reason) (grpcbridge_tunnels_active)"],
                       exported)) == 1
    assert len(unknown(["sum by (le) (rate(grpcbridge_bytes_total[5m]))"], exported)) == 1
    expr = "sum by (instance) (rate(grpcbridge_upgrades_rejected_total[5m])) > 0"
    assert len(unknown([expr], exported, {expr: {"reason"}})) == 1
    assert unknown([expr], exported, {expr: {"instance"}}) == []
    assert len(unknown(["sum(grpcbridge_tunnels_active)"], exported,
                       {"sum(grpcbridge_tunnels_active)": {"instance"}})) == 1
    assert unknown(['up{job="x"} == 0'], exported, {'up{job="x"} == 0': {"instance"}}) == []
    # Each deploy file names the bridge's metrics at all (a parser that found nothing
    # would pass every file), and shows labels somewhere (or the template check is idle).
    for name, values in expressions.items():
        named = {series for expr in values for series in series_in(expr)}
        assert {"grpcbridge_tunnels_active", "grpcbridge_tunnels_closed_total",
                "grpcbridge_backend_dial_failures_total"} <= named, (name, named)
    assert "instance" in set().union(*alert_templates().values())
    assert {"reason", "code", "direction"} <= set().union(*dashboard_templates().values())
    assert any(values_in(expr) for expr in alert_expressions())
