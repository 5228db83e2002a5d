"""deploy/k8s: every manifest valid against the Kubernetes schemas (offline, `kubernetes-validate`), and what ragq
needs of them: GPU workers per model that finish their jobs on scale-down, and a KEDA ScaledObject per model.

KEDA's ScaledObject is a custom resource, absent from the built-in schemas: it is checked against SCALED_OBJECT,
a JSON schema written here from KEDA's ScaledObject specification (keda.sh/docs/latest/reference/scaledobject-spec,
and the Prometheus scaler's page), closed (`additionalProperties: false`) so that a misspelt field fails.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.config import Settings
from tests.test_monitoring_config import SERIES, metrics_in

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes still commonly run, and the newest this kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
HF_HOME = "/cache/huggingface"

_INT = {"type": "integer", "minimum": 0}
_NUMBER_STRING = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
SCALED_OBJECT: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {"failureThreshold": _INT, "replicas": _INT, "behavior": {"type": "string"}},
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object", "required": ["name"]},
                            # KEDA reads every metadata value as a string.
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}
PROMETHEUS_TRIGGER: dict[str, Any] = {
    "type": "object",
    "required": ["serverAddress", "query", "threshold"],
    "additionalProperties": False,
    "properties": {
        "serverAddress": {"type": "string", "pattern": "^https?://"},
        "query": {"type": "string"},
        "threshold": _NUMBER_STRING,
        "activationThreshold": _NUMBER_STRING,
        "ignoreNullValues": {"enum": ["true", "false"]},
        "namespace": {"type": "string"},
        "customHeaders": {"type": "string"},
        "queryParameters": {"type": "string"},
        "unsafeSsl": {"enum": ["true", "false"]},
    },
}


def load_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, document)
        for path in sorted(K8S.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document is not None
    ]


MANIFESTS = load_manifests()


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in MANIFESTS if doc["kind"] == kind]


def by_name(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in of_kind(kind)}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def worker_deployments() -> dict[str, dict[str, Any]]:
    """Model name -> its worker Deployment."""
    return {
        doc["metadata"]["labels"]["ragq.dev/model"]: doc
        for doc in of_kind("Deployment")
        if doc["metadata"]["labels"].get("app.kubernetes.io/name") == "ragq-worker"
    }


def plain_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("name", "document"),
    [(n, d) for n, d in MANIFESTS if d["kind"] != "ScaledObject"],
    ids=[f"{n}:{d['kind']}" for n, d in MANIFESTS if d["kind"] != "ScaledObject"],
)
def test_manifest_is_valid_against_the_kubernetes_schema(name: str, document: dict[str, Any], version: str) -> None:
    # strict: a field the schema does not know (a typo) fails too.
    kubernetes_validate.validate(document, version, strict=True)


def test_the_schema_check_catches_a_misplaced_field() -> None:
    deployment = dict(by_name("Deployment")["ragq-api"])
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_everything_is_in_the_ragq_namespace() -> None:
    for name, doc in MANIFESTS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "ragq", name


def test_every_service_selects_pods_of_its_workload() -> None:
    workloads = of_kind("Deployment") + of_kind("StatefulSet")
    for service in of_kind("Service"):
        selector = service["spec"]["selector"].items()
        matched = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert matched, service["metadata"]["name"]
        ports = {p["name"] for w in matched for p in container(w).get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def ragq_settings(deployment: dict[str, Any]) -> Settings:
    """The settings a container of `deployment` starts with: the ConfigMap, then its own RAGQ_* variables."""
    config = by_name("ConfigMap")["ragq-config"]["data"]
    own = {k: v for k, v in plain_env(container(deployment)).items() if k.startswith("RAGQ_")}
    return Settings.from_env({**config, **own})


def test_the_api_and_every_worker_start_on_settings_ragq_accepts() -> None:
    api = ragq_settings(by_name("Deployment")["ragq-api"])
    download = by_name("Job")["ragq-model-download"]["spec"]["template"]["spec"]
    downloaded = {arg for c in download["containers"] for arg in c["args"]}
    for model, deployment in worker_deployments().items():
        spec = ragq_settings(deployment).worker_spec
        assert spec.name == model
        # The API accepts its jobs, and the download Job put its weights in the cache the worker reads offline.
        assert model in api.model_names
        assert spec.source in downloaded
        assert plain_env(container(deployment))["HF_HUB_OFFLINE"] == "1"


def test_the_api_is_probed_on_healthz_and_needs_api_keys() -> None:
    api = container(by_name("Deployment")["ragq-api"])
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = plain_env(api)
    assert env["RAGQ_HOST"] == "0.0.0.0" and env["RAGQ_API_KEYS_FILE"].startswith("/etc/ragq/keys/")
    assert env["REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@redis.ragq.svc:6379/0"


def test_redis_keeps_jobs_with_a_password_from_a_secret() -> None:
    redis = container(by_name("StatefulSet")["redis"])
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert '--requirepass "$REDIS_PASSWORD"' in command
    [password] = [e for e in redis["env"] if e["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"] == {"name": "ragq-redis", "key": "password"}


@pytest.mark.parametrize("model", sorted(worker_deployments()))
def test_a_worker_takes_one_gpu_the_shared_model_cache_and_its_model(model: str) -> None:
    deployment = worker_deployments()[model]
    pod = deployment["spec"]["template"]["spec"]
    worker = container(deployment)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["command"] == ["ragq", "worker", "--model", model]
    env = plain_env(worker)
    assert env["RAGQ_WORKER_MODEL"] == model and env["HF_HOME"] == HF_HOME
    [cache] = [m for m in worker["volumeMounts"] if m["mountPath"] == HF_HOME]
    [volume] = [v for v in pod["volumes"] if v["name"] == cache["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] in by_name("PersistentVolumeClaim")
    assert {"configMapRef": {"name": "ragq-config"}} in worker["envFrom"]
    # KEDA owns the replica count: a `replicas` here would undo its scaling on every `kubectl apply`.
    assert "replicas" not in deployment["spec"]


@pytest.mark.parametrize("model", sorted(worker_deployments()))
def test_a_worker_outlives_its_longest_job_on_termination(model: str) -> None:
    pod = worker_deployments()[model]["spec"]["template"]["spec"]
    # The longest one job may run is RAGQ_TASK_TIME_LIMIT_S (a microbatch is shorter): it must not be cut.
    assert pod["terminationGracePeriodSeconds"] > Settings().task_time_limit_s


@pytest.mark.parametrize("model", sorted(worker_deployments()))
def test_a_workers_metrics_port_is_annotated_for_scraping(model: str) -> None:
    template = worker_deployments()[model]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    ports = {p["name"]: p["containerPort"] for p in container(worker_deployments()[model])["ports"]}
    assert ports["metrics"] == int(annotations["prometheus.io/port"]) == 9100


@pytest.mark.parametrize("scaled", of_kind("ScaledObject"), ids=lambda d: d["metadata"]["name"])
def test_scaled_object_matches_kedas_specification(scaled: dict[str, Any]) -> None:
    jsonschema.validate(scaled, SCALED_OBJECT)
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        jsonschema.validate(trigger["metadata"], PROMETHEUS_TRIGGER)


def test_the_scaled_object_schema_refuses_a_misspelt_field() -> None:
    scaled = of_kind("ScaledObject")[0]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**scaled, "spec": {**scaled["spec"], "cooldownPeriods": 10}}, SCALED_OBJECT)


def test_every_model_has_a_scaled_object_on_its_own_queue_depth() -> None:
    scaled_by_target = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in of_kind("ScaledObject")}
    for model, deployment in worker_deployments().items():
        scaled = scaled_by_target[deployment["metadata"]["name"]]
        spec = scaled["spec"]
        # Down to zero when nothing waits; one waiting job wakes a worker; idle for a while before the last goes.
        assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
        assert spec["triggers"][0]["metadata"]["activationThreshold"] == "0"
        assert spec["cooldownPeriod"] >= 300
        query = spec["triggers"][0]["metadata"]["query"]
        assert metrics_in(query) == {"ragq_queue_depth", "ragq_jobs_running"} and metrics_in(query) <= SERIES
        assert query.count(f'model="{model}"') == 2 and "model=~" not in query


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_parses_every_scaling_query(tmp_path: Path) -> None:
    rules = [
        {"record": f"ragq:scale_{i}", "expr": doc["spec"]["triggers"][0]["metadata"]["query"]}
        for i, doc in enumerate(of_kind("ScaledObject"))
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "keda", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
