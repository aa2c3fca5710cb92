"""Offline validation of what operators deploy: YAML lint, Kubernetes schemas (strict), the
KEDA and Prometheus-operator resources against their CRD schemas, kustomization references,
Grafana dashboards whose every PromQL metric is exported, and the Dockerfile."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from yamllint import linter
from yamllint.config import YamlLintConfig

from shared.settings import (
    SECRET_SETTINGS,
    SERVICE_SETTINGS,
    CommonSettings,
    DatabaseSettings,
    Settings,
)
from tests.conftest import IN_CI, running
from tests.support.smtp import SmtpTestServer
from tests.test_scheduler_api import add_servers, emails

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"
CRD_GROUPS = ("keda.sh", "monitoring.coreos.com")
YAML_FILES = sorted(
    p for p in [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")] if "node_modules" not in p.parts
)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yamllint(path: Path) -> None:
    config = YamlLintConfig(file=str(ROOT / ".yamllint.yaml"))
    problems = [f"{p.line}: {p.message}" for p in linter.run(path.read_text(), config)]
    assert problems == []


RESOURCES = [
    (path, doc)
    for path in YAML_FILES
    if path.name != "kustomization.yaml" and "grafana" not in path.parts
    for doc in documents(path)
]


@pytest.mark.parametrize(
    ("path", "doc"),
    [(p, d) for p, d in RESOURCES if not d["apiVersion"].startswith(CRD_GROUPS)],
    ids=lambda v: v["kind"] + "/" + v["metadata"]["name"] if isinstance(v, dict) else v.name,
)
def test_core_resources_are_valid_kubernetes(path: Path, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_custom_resources_match_their_crd_schemas() -> None:
    node = shutil.which("node")
    checker = K8S / "crd-check"
    if node is None or not (checker / "node_modules").exists():
        message = "node and `make deploy-deps` are needed to check the CRD resources"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    files = [str(p) for p, d in RESOURCES if d["apiVersion"].startswith(CRD_GROUPS)]
    assert len(files) >= 2
    result = subprocess.run(  # noqa: S603 - our own script, fixed arguments
        [node, str(checker / "check.mjs"), *sorted(set(files))],
        capture_output=True,
        text=True,
        check=False,
        cwd=checker,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 custom resources valid" in result.stdout


KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_references_resolve(path: Path) -> None:
    spec = yaml.safe_load(path.read_text())
    here = path.parent
    for entry in [*spec.get("resources", []), *spec.get("components", [])]:
        target = (here / entry).resolve()
        assert target.exists(), f"{entry} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists(), f"{entry} has no kustomization"
    for generator in spec.get("configMapGenerator", []):
        for file in generator.get("files", []):
            assert (here / file.split("=")[-1]).exists(), file
    names = {(d["kind"], d["metadata"]["name"]) for _, d in RESOURCES}
    for patch in spec.get("patches", []):
        target = patch["target"]
        assert (target["kind"], target["name"]) in names, f"patch target {target} not found"


def test_sender_grace_period_outlasts_its_drain() -> None:
    config = next(d for _, d in RESOURCES if d["kind"] == "ConfigMap")
    drain = float(config["data"]["ABL_SENDER_DRAIN_SECONDS"])
    sender = next(
        d
        for _, d in RESOURCES
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "abl-sender"
    )
    assert sender["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


DASHBOARDS = sorted((K8S / "base" / "dashboards").glob("*.json"))
PROMETHEUS_OWN = {"up"}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    stripped = re.sub(r'"[^"]*"', "", expr)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", stripped)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
        following = stripped[match.end() :].lstrip()
        if following.startswith("(") or match.group() in KEYWORDS:
            continue
        names.add(match.group())
    return names


def test_dashboards_have_fixed_unique_uids() -> None:
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert sorted(uids) == ["abl-overview", "abl-registry", "abl-scheduler", "abl-sender"]


def test_metric_names_parser() -> None:
    assert metric_names(
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="y"}[5m]))) / clamp_min(b, 1e-9)'
    ) == {"a_bucket", "b"}


async def test_every_dashboard_query_names_an_exported_metric(
    settings: Settings, starttls_server: SmtpTestServer
) -> None:
    async with running(settings, combined=True) as api:
        tenant = await api.new_tenant()
        await add_servers(api, tenant, starttls_server)
        await api.client.post("/v1/messages", json=emails(2), headers=tenant)
        exposition = (await api.client.get("/metrics")).text
    exported = set()
    for family in text_string_to_metric_families(exposition):
        # A labelled metric with no child yet exposes only its HELP and TYPE lines.
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        exported |= {family.name + s for s in suffixes.get(family.type, ("",))}
    missing = {}
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                unknown = metric_names(target["expr"]) - exported - PROMETHEUS_OWN
                if unknown:
                    missing[f"{path.name}: {panel['title']}"] = sorted(unknown)
    assert missing == {}


def test_dockerfile_is_multi_stage_non_root_and_pinned() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert len(stages) >= 2
    assert all(re.match(r"python:\d+\.\d+\.\d+-slim-\w+", image) for image in stages)
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)


def test_environment_has_no_stray_secrets() -> None:
    secrets = [d for _, d in RESOURCES if d["kind"] == "Secret"]
    assert len(secrets) == 6
    for secret in secrets:
        for value in secret["stringData"].values():
            # Empty: an optional feature left off (the OAuth clients).
            assert "CHANGE-ME" in value or value in ("changeme", ""), "a real secret in the repo?"
    assert os.path.exists(K8S / "crd-check" / "package-lock.json")


def secret_keys_reachable(container: dict[str, Any]) -> set[str]:
    """Every secret key a container can read: env entries from a Secret, and every key of each
    Secret it takes whole with envFrom."""
    secrets = {d["metadata"]["name"]: d for _, d in RESOURCES if d["kind"] == "Secret"}
    keys = set()
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            keys.add(ref["key"])
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            keys |= set(secrets[source["secretRef"]["name"]]["stringData"])
    for volume_mount in container.get("volumeMounts", []):
        raise AssertionError(f"unexpected volume {volume_mount}: secrets come by environment")
    return keys


def workloads() -> list[tuple[str, dict[str, Any]]]:
    """(service, container) of every Deployment and Job, the service read from its args."""
    found = []
    for _, doc in RESOURCES:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            args = container["args"]
            service = args[args.index("--service") + 1] if "--service" in args else args[0]
            found.append((service, container))
    return found


def test_the_sender_pod_references_no_key_no_admin_token_no_database() -> None:
    [sender] = [c for service, c in workloads() if service == "sender"]
    reachable = secret_keys_reachable(sender)
    assert reachable == {"ABL_AMQP_URL", "ABL_INTERNAL_TOKEN"}
    assert not {"ABL_ENCRYPTION_KEYS", "ABL_ADMIN_TOKEN", "ABL_DATABASE_URL"} & reachable


def test_no_workload_can_read_a_secret_its_service_does_not_use() -> None:
    reads: dict[str, type[CommonSettings]] = {
        "migrate": DatabaseSettings,
        **{name: kind for name, kind in SERVICE_SETTINGS.items() if name != "all"},
    }
    seen = set()
    for service, container in workloads():
        declared = {f"ABL_{name.upper()}" for name in reads[service].model_fields}
        reachable = secret_keys_reachable(container)
        assert reachable <= declared, (service, reachable - declared)
        # And nothing it needs is missing (the gateway is not deployed: the Ingress routes).
        needed = {f"ABL_{n.upper()}" for n in SECRET_SETTINGS if n in reads[service].model_fields}
        assert needed <= reachable, (service, needed - reachable)
        seen.add(service)
    assert seen == {"registry", "scheduler", "sender", "webhooks", "migrate"}


def test_every_public_path_reaches_its_service_through_the_gateway_and_the_ingress() -> None:
    """Each path of a service's public spec is routed to that service, by the gateway (the
    stack) and by the Ingress (Kubernetes), e.g. the OAuth callback to the registry."""
    from services.gateway.domain import route

    ingress = yaml.safe_load((K8S / "base" / "ingress.yaml").read_text())
    rules = [
        (re.compile(f"^{p['path']}"), p["backend"]["service"]["name"].removeprefix("abl-"))
        for p in ingress["spec"]["rules"][0]["http"]["paths"]
    ]
    checked = 0
    for service in ("registry", "scheduler", "webhooks"):
        spec = json.loads((ROOT / "openapi" / f"{service}.json").read_text())
        for template in spec["paths"]:
            if not template.startswith("/v1/"):
                continue  # probes are not public
            path = re.sub(r"\{[^}]+\}", "x1", template)
            assert route(path) == service, template
            # ingress-nginx tries regex paths longest first: no path may match two services'.
            assert {name for pattern, name in rules if pattern.match(path)} == {service}, template
            checked += 1
    assert checked >= 24
