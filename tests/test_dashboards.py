"""deploy/: the Grafana dashboard (grafana/smi.json) is valid JSON whose queries parse as PromQL;
its queries and the alert rules (prometheus/alerts.yml) name only metrics that a real API and
a real worker export, both scraped here after a job."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import png_bytes
from tests.helpers import order
from tests.test_alerts import RULES, promtool
from tests.test_metrics import BEARER, METRICS_TOKEN, client_exporting_metrics
from worker import create_worker

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "smi.json"
METRIC = re.compile(r"\b(?:smi|temporal)_\w+")
SERIES_OF = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}  # what a query names


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panels += [inner for panel in panels for inner in panel.get("panels", [])]  # rows may hold panels
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def alert_queries() -> list[str]:
    return [
        rule["expr"]
        for group in yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    ]


def exported(text: str) -> set[str]:
    """The series names a query can select: a counter's `_total`, a histogram's `_bucket`, `_sum`,
    `_count`, a gauge's own name; families without samples yet (the API declares all) count too."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SERIES_OF.get(family.type, [""]))
        names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_is_valid_json_and_its_queries_parse(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert [v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"] == ["datasource"]
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["title"] and set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel
    # promtool parses each query as a recording rule; Grafana's range variables become durations.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query_{n}",
                        "expr": query.replace("$__rate_interval", "5m").replace("$__range", "1d"),
                    }
                    for n, query in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", str(tmp_path / "queries.yml"))


async def test_dashboard_and_alerts_name_only_metrics_that_are_exported(dev_env, stack_factory, faults):
    faults(delay_seconds=0.2)
    stack = stack_factory(dev_env, metrics_token=METRICS_TOKEN, daily_budget_usd=50, monthly_budget_usd=1000)
    client, address = await client_exporting_metrics(dev_env)
    api = stack.client()
    async with create_worker(client, stack.settings):
        job_id = (
            await asyncio.to_thread(
                api.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(40, 30)), "dashboard-1", scale_factor=2)
            )
        ).json()["job_id"]
        await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()
        worker_text = (await asyncio.to_thread(httpx.get, f"http://{address}/metrics")).text
    api_reply = await asyncio.to_thread(httpx.get, f"{stack.api.url}/metrics", headers=BEARER)
    assert api_reply.status_code == 200

    names = exported(worker_text) | exported(api_reply.text)
    for source, queries in (
        ("deploy/grafana/smi.json", dashboard_queries()),
        ("deploy/prometheus/alerts.yml", alert_queries()),
    ):
        used = {name for query in queries for name in METRIC.findall(re.sub(r'"[^"]*"', "", query))}
        assert used, source
        assert used <= names, f"{source} names metrics nobody exports: {sorted(used - names)}"
