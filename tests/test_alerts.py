"""deploy/prometheus/alerts.yml: valid rules (`promtool check rules`) that fire when they should
and only then (`promtool test rules alerts.test.yml`). promtool is Debian's `prometheus`
package, installed by .ci/install-prometheus; the metric names are checked against real
servers in tests/test_dashboards.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def promtool(*args: str) -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: run `bash .ci/install-prometheus`"
    done = subprocess.run([tool, *args], cwd=RULES, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def alert_names() -> set[str]:
    return {
        rule["alert"]
        for group in yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }


def test_rules_are_valid():
    assert f"SUCCESS: {len(alert_names())} rules found" in promtool("check", "rules", "alerts.yml")


def test_rules_fire_when_they_should():
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


def test_every_alert_is_seen_firing_by_a_unit_test():
    fired = {
        case["alertname"]
        for test in yaml.safe_load((RULES / "alerts.test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert alert_names() == fired
