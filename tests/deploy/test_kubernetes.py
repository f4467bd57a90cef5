"""The Kubernetes manifests: both overlays (and the KEDA variant) render with kustomize, validate
against the Kubernetes API schemas and the CRDs offline, pass checkov, and agree with the service
they deploy: its settings, routes, metrics and drain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_testing import REPO, deploy_python, run, tool

from service.metrics import Metrics
from service.routes import ops
from service.settings import Settings

KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = ["gpu", "cpu", "gpu-keda"]
# Not the bare overlay name as the test id: a test whose keywords include "gpu" needs CUDA.
IDS = [f"overlays/{o}" for o in OVERLAYS]

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each overlay rendered by `kubectl kustomize` into a file."""
    kubectl = tool("kubectl")
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for overlay in OVERLAYS:
        done = run([kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)])
        assert done.returncode == 0, done.stderr
        files[overlay] = out / f"{overlay}.yaml"
        files[overlay].write_text(done.stdout)
    return files


def objects(path: Path) -> dict[str, Manifest]:
    """The rendered objects by kind (each overlay has one of each)."""
    found: dict[str, Manifest] = {}
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["kind"] not in found, f"two {doc['kind']} objects"
        found[doc["kind"]] = doc
    return found


def container(manifests: dict[str, Manifest]) -> Manifest:
    (only,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(only)


def env_of(c: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in c["env"]}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_overlays_validate_against_the_kubernetes_schemas(
    rendered: dict[str, Path], overlay: str
) -> None:
    validate = tool("kubernetes-validate")
    done = run([validate, "--strict", "--kubernetes-version", "1.37.0", str(rendered[overlay])])
    assert done.returncode == 0, done.stdout + done.stderr
    passed = done.stdout.count(" passed for resource ")
    kinds = objects(rendered[overlay])
    custom = {"ServiceMonitor", "ScaledObject"} & kinds.keys()
    assert passed == len(kinds) - len(custom), done.stdout
    # The custom resources, which kubernetes-validate has no schema for, against their CRDs.
    crds = run([deploy_python(), str(KUBERNETES / "validate_crds.py"), str(rendered[overlay])])
    assert crds.returncode == 0, crds.stdout + crds.stderr
    assert crds.stdout.count("PASS ") == len(custom), crds.stdout


def test_checkov_passes_and_each_skip_is_justified(rendered: dict[str, Path]) -> None:
    checkov = tool("checkov")
    secret = KUBERNETES / "base" / "secret.example.yaml"
    for path in [*rendered.values(), secret]:
        done = run(
            [checkov, "--file", str(path), "--framework", "kubernetes", "--skip-download",
             "--output", "json", "--quiet"],
            timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        report = json.loads(done.stdout) if done.stdout.strip() else {}
        summary = report.get("summary", {"failed": 0, "passed": 0})
        assert summary["failed"] == 0 and summary["passed"] > 0, summary
        for check in report.get("results", {}).get("skipped_checks", []):
            assert check["check_id"] in justified_skips(path), check["check_id"]


def justified_skips(path: Path) -> set[str]:
    """Checks skipped with a `checkov.io/skipN: CHECK=reason` annotation that gives a reason."""
    skips = set()
    for doc in yaml.safe_load_all(path.read_text()):
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert len(reason.split()) >= 5, f"{check} skipped without a reason"
                skips.add(check)
    return skips


def test_the_gpu_overlay_asks_for_one_gpu_and_cuda(rendered: dict[str, Path]) -> None:
    c = container(objects(rendered["gpu"]))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(c)["LINMOD_DEVICE"]["value"] == "cuda"
    cpu = container(objects(rendered["cpu"]))
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert env_of(cpu)["LINMOD_DEVICE"]["value"] == "cpu"
    # ONNX Runtime's threads match the CPU limit, not the node's cores.
    assert int(env_of(cpu)["LINMOD_INTRA_OP_THREADS"]["value"]) == int(
        cpu["resources"]["limits"]["cpu"]
    )


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_every_setting_is_one_the_service_accepts(
    rendered: dict[str, Path], overlay: str, tmp_path: Path
) -> None:
    env = env_of(container(objects(rendered[overlay])))
    fields = {f"LINMOD_{name.upper()}" for name in Settings.model_fields}
    assert env.keys() <= fields, env.keys() - fields
    values = {k[len("LINMOD_") :].lower(): e["value"] for k, e in env.items() if "value" in e}
    Settings(model_dir=tmp_path, **values)  # raises on a value the service would refuse
    secrets = {k: e["valueFrom"]["secretKeyRef"] for k, e in env.items() if "valueFrom" in e}
    assert secrets["LINMOD_DATABASE_URL"] == {"name": "linmod", "key": "database-url"}
    assert secrets["LINMOD_API_KEYS"]["optional"] is True
    example = yaml.safe_load((KUBERNETES / "base" / "secret.example.yaml").read_text())
    assert {ref["key"] for ref in secrets.values()} == example["stringData"].keys()
    assert example["stringData"]["database-url"].startswith("postgresql+psycopg://")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_probes_security_and_the_drain(rendered: dict[str, Path], overlay: str) -> None:
    manifests = objects(rendered[overlay])
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    c = container(manifests)
    routes = {route.path for route in ops.router.routes}  # type: ignore[attr-defined]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" in routes
    assert c["livenessProbe"]["httpGet"]["path"] == "/health" in routes
    assert c["startupProbe"]["httpGet"]["path"] == "/health"

    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] > 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}} in pod["volumes"]
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys() & c["resources"]["limits"].keys()

    # The grace period covers the preStop pause, the drain (requests in flight finish) and the
    # server's shutdown, each bounded by its setting.
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    settings = Settings(
        model_dir=Path("."),
        **{k[len("LINMOD_") :].lower(): e["value"] for k, e in env_of(c).items() if "value" in e},
    )
    drain_s = settings.drain_delay_s + settings.drain_grace_s + settings.shutdown_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + drain_s
    assert manifests["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS, ids=IDS)
def test_selectors_and_ports_line_up(rendered: dict[str, Path], overlay: str) -> None:
    m = objects(rendered[overlay])
    pod_labels = m["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        m["Deployment"]["spec"]["selector"]["matchLabels"],
        m["Service"]["spec"]["selector"],
        m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        m["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items(), selector
    monitor = m["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= m["Service"]["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in m["Service"]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert m["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    namespaces = {
        doc["metadata"].get("namespace") for kind, doc in m.items() if kind != "Namespace"
    }
    assert namespaces == {m["Namespace"]["metadata"]["name"]}


def queue_metric() -> tuple[str, dict[str, str]]:
    """The service's interactive queue-depth series, read from its own registry."""
    for family in Metrics().registry.collect():
        for sample in family.samples:
            if sample.name == "linmod_queue_items" and sample.labels == {"priority": "interactive"}:
                return sample.name, sample.labels
    raise AssertionError("the service exports no interactive queue depth")


def test_autoscaling_uses_the_services_queue_depth(rendered: dict[str, Path]) -> None:
    series, labels = queue_metric()
    adapter = yaml.safe_load((KUBERNETES / "prometheus-adapter-rules.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert (
        rule["seriesQuery"].startswith(series + "{")
        and 'priority="interactive"' in rule["seriesQuery"]
    )
    assert 'priority="interactive"' in rule["metricsQuery"]
    served_as = rule["name"]["as"]

    for overlay in ("gpu", "cpu"):
        hpa = objects(rendered[overlay])["HorizontalPodAutoscaler"]["spec"]
        (metric,) = hpa["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == served_as
        assert hpa["minReplicas"] >= 2 and hpa["scaleTargetRef"]["name"] == "linmod"

    keda = objects(rendered["gpu-keda"])
    assert "HorizontalPodAutoscaler" not in keda  # KEDA makes its own; two would fight
    scaled = keda["ScaledObject"]["spec"]
    hpa = objects(rendered["gpu"])["HorizontalPodAutoscaler"]["spec"]
    (trigger,) = scaled["triggers"]
    assert f"{series}{{" in trigger["metadata"]["query"]
    assert 'priority="interactive"' in trigger["metadata"]["query"]
    assert trigger["metadata"]["threshold"] == hpa["metrics"][0]["pods"]["target"]["averageValue"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (
        hpa["minReplicas"],
        hpa["maxReplicas"],
    )
    assert labels == {"priority": "interactive"}
