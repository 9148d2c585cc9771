"""The Kubernetes manifests in deploy/kubernetes, checked offline: every object against the
Kubernetes API schemas (kubernetes-validate), and their wiring against what the server does."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

pytestmark = pytest.mark.fast
DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def _objects() -> dict[str, dict]:
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    objects = {}
    for name in listed:
        for document in yaml.safe_load_all((DEPLOY / name).read_text()):
            objects[f"{document['kind']}/{document['metadata']['name']}"] = document
    return objects


def test_every_object_validates_against_the_kubernetes_schemas():
    objects = _objects()
    assert len(objects) == 7
    for document in objects.values():
        kubernetes_validate.validate(document, latest_version(), strict=True)  # raises if invalid
    broken = dict(_objects()["Deployment/flux-triton"])
    broken["spec"] = dict(broken["spec"], replica=2)  # a misspelt field is caught
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, latest_version(), strict=True)


def test_triton_pods_probe_health_and_run_on_one_gpu():
    deployment = _objects()["Deployment/flux-triton"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "supervisor": 8003}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # a first GPU compile
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/models", "/dev/shm", "/compile-cache"} <= mounts
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FLUX_TRITON_COMPILE_CACHE"] == "/compile-cache"
    assert env["FLUX_TRITON_MODEL_DIR"].startswith("/models/")


def test_services_autoscaler_and_gateway_point_at_the_right_things():
    objects = _objects()
    hpa = objects["HorizontalPodAutoscaler/flux-triton"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "flux-triton"}
    # the metrics flux_bls exports, which rise with load (tests/test_load.py, tests/test_queue.py)
    assert [m["pods"]["metric"]["name"] for m in hpa["metrics"]] == ["flux_active_requests",
                                                                    "flux_queue_length"]
    triton_labels = objects["Deployment/flux-triton"]["spec"]["template"]["metadata"]["labels"]
    assert objects["Service/flux-triton"]["spec"]["selector"] == triton_labels
    gateway = objects["Deployment/flux-gateway"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in gateway["env"]}
    assert env["GATEWAY_TRITON_URL"] == "flux-triton:8001" and env["GATEWAY_HOST"] == "0.0.0.0"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_dockerfile_runs_the_supervised_launcher():
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert "flux_triton.server.launcher" in dockerfile and "--supervisor-port" in dockerfile
    assert "FLUX_TRITONSERVER_ROOT=/opt/tritonserver" in dockerfile


def test_only_the_gateway_reaches_tritons_inference_port():
    """The NetworkPolicy isolates the Triton pods: gRPC from the gateway's pods alone, metrics and
    the supervisor's from the namespace, HTTP from no pod (the kubelet's probes come from the node,
    which NetworkPolicy always allows)."""
    objects = _objects()
    policy = objects["NetworkPolicy/flux-triton"]["spec"]
    triton = objects["Deployment/flux-triton"]["spec"]["template"]
    gateway = objects["Deployment/flux-gateway"]["spec"]["template"]
    assert policy["podSelector"]["matchLabels"] == triton["metadata"]["labels"]
    assert policy["policyTypes"] == ["Ingress"]
    named_ports = {p["name"] for p in triton["spec"]["containers"][0]["ports"]}
    reachable = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in named_ports
            reachable[port["port"]] = rule["from"]
    assert set(reachable) == {"grpc", "metrics", "supervisor"}  # not http
    assert reachable["grpc"] == [{"podSelector": {"matchLabels": gateway["metadata"]["labels"]}}]
    assert objects["Service/flux-triton"]["spec"].get("type", "ClusterIP") == "ClusterIP"
