"""deploy/k8s: every manifest is valid against Kubernetes' own schemas (kubernetes-validate, which
bundles them: no cluster, no network), and the numbers that must agree with tokenmill do: the port,
the probe path, --shutdown-timeout vs the grace period, the metric the autoscaler scales on."""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.server.conftest import scrape
from tokenmill.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
# The oldest version the manifests need (preStop's sleep action, on by default since 1.30) and the
# newest the pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
MARGIN_SECONDS = (5, 30)
"""What the grace period may leave beyond preStop + --shutdown-timeout for the process to exit."""


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource under deploy/k8s, by kind."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for resource in yaml.safe_load_all(path.read_text()):
            found[resource["kind"]] = resource
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    resources = manifests()
    assert set(resources) == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for resource in resources.values():
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_validator_catches_a_misspelt_field_and_a_wrong_type() -> None:
    deployment = manifests()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for breakage in ({"readinesProbe": container["readinessProbe"]},
                     {"ports": [{"containerPort": "8000"}]}):
        broken = copy.deepcopy(deployment)
        broken["spec"]["template"]["spec"]["containers"][0].update(breakage)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def dockerfile_exec_form(instruction: str) -> list[str]:
    """The JSON array of the Dockerfile's (last) ENTRYPOINT or CMD."""
    lines = [line for line in DOCKERFILE.read_text().splitlines()
             if line.startswith(instruction + " ")]
    return json.loads(lines[-1][len(instruction) + 1:])


def container_command() -> tuple[dict[str, Any], list[str]]:
    """The tokenmill container and the command line it runs (image entrypoint + manifest args)."""
    deployment = manifests()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return container, dockerfile_exec_form("ENTRYPOINT") + container["args"]


def image_default_args() -> argparse.Namespace:
    """What ``docker run IMAGE`` runs (ENTRYPOINT + CMD), parsed by tokenmill's parser."""
    command = dockerfile_exec_form("ENTRYPOINT") + dockerfile_exec_form("CMD")
    return build_parser().parse_args(command[1:])


def test_the_container_command_is_one_tokenmill_accepts_and_matches_the_ports() -> None:
    container, command = container_command()
    assert command[0] == "tokenmill"
    args = build_parser().parse_args(command[1:])  # tokenmill's real parser: flags must exist
    assert args.command == "serve" and args.host == "0.0.0.0"
    resources = manifests()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port}
    annotations = resources["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    service_port = resources["Service"]["spec"]["ports"][0]
    assert service_port["targetPort"] == "http"
    assert (resources["Service"]["spec"]["selector"]
            == resources["Deployment"]["spec"]["selector"]["matchLabels"])
    # The image's HEALTHCHECK asks the same port and path as the probes.
    healthcheck = next(line for line in DOCKERFILE.read_text().splitlines()
                       if line.strip().startswith("CMD [\"curl\""))
    assert f"http://127.0.0.1:{args.port}/health" in healthcheck
    # The image's default CMD (for docker run) parses too.
    image_default_args()


def test_the_grace_period_covers_the_drain() -> None:
    container, command = container_command()
    args = build_parser().parse_args(command[1:])
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    margin = pod["terminationGracePeriodSeconds"] - pre_stop - args.shutdown_timeout
    assert MARGIN_SECONDS[0] <= margin <= MARGIN_SECONDS[1], (
        f"terminationGracePeriodSeconds should be preStop {pre_stop} s + --shutdown-timeout "
        f"{args.shutdown_timeout} s + a few seconds; it leaves {margin} s")
    # The image's CMD states the same drain time when run without the manifest's args.
    assert image_default_args().shutdown_timeout == args.shutdown_timeout


def test_probes_and_the_autoscaled_metric_exist_on_a_real_server(tokenmill_server) -> None:
    container, _ = container_command()
    paths = {container[probe]["httpGet"]["path"]
             for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"/health"}
    assert httpx.get(tokenmill_server.url + "/health").status_code == 200
    # The adapter rule selects a series tokenmill exports and renames it to the HPA's metric.
    adapter = yaml.safe_load(manifests()["ConfigMap"]["data"]["config.yaml"])["rules"][0]
    series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", adapter["seriesQuery"]).group(1)
    exported = {name for name, _labels in scrape(tokenmill_server.url)}
    assert series in exported, f"{series} is not among tokenmill's metrics"
    renamed = re.sub(adapter["name"]["matches"],
                     adapter["name"]["as"].replace("${1}", r"\1"), series)
    hpa_metric = manifests()["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]
    assert hpa_metric["name"] == renamed


def test_the_deployment_runs_as_the_image_user() -> None:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    user = next(shlex.split(line)[1] for line in DOCKERFILE.read_text().splitlines()
                if line.startswith("USER "))
    assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert pod["securityContext"]["runAsNonRoot"] is True
