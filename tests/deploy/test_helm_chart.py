"""The Helm chart, rendered by a real helm and checked against the Kubernetes API schemas.

Skipped (with the install command) when no helm binary is found; the schema checks need the
`kubernetes-validate` package, which ships the Kubernetes OpenAPI schemas offline.
"""

from __future__ import annotations

import pytest
import yaml

from deploy_testing import CHART, HELM_MISSING, by_kind, find_helm, helm, helm_template, one, values_file

pytestmark = pytest.mark.skipif(find_helm() is None, reason=HELM_MISSING)

# Oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and a current one.
KUBERNETES_VERSIONS = ["1.25.0", "1.37.0"]
# Custom resources: no schema in kubernetes-validate; checked by hand below.
CRD_KINDS = {"ServiceMonitor"}

VALUE_SETS = {
    "default": [],
    "gpu": ["-f", values_file("values-gpu.yaml")],
    "autoscaling": ["-f", values_file("values-autoscaling.yaml")],
    "everything": ["-f", values_file("values-autoscaling.yaml"), "--set", "ingress.enabled=true",
                   "--set", "apiKey.value=s3cret", "--set", "shmSizeLimit=1Gi",
                   "--set", "ingress.tls[0].hosts[0]=dspark.example.com", "--set", "ingress.tls[0].secretName=tls"],
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: helm_template(*args) for name, args in VALUE_SETS.items()}


def container(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


# ---------------------------------------------------------------- helm's own checks

@pytest.mark.parametrize("name", ["default", "gpu", "autoscaling"])
def test_helm_lint_is_clean(name):
    proc = helm("lint", "--strict", str(CHART), *VALUE_SETS[name])
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_manifests_match_the_kubernetes_schemas(rendered, name, version):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    checked = 0
    for doc in rendered[name]:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(doc, version, strict=True)  # strict: unknown fields are errors too
        except kv.ValidationError as e:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (values {name}, k8s {version}): {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 5


def test_the_schema_validator_catches_a_bad_manifest():
    """Guard against a validator that accepts anything (e.g. a version without schemas)."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": "eighty"}], "selectr": {}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_each_value_set_renders_the_expected_objects(rendered):
    kinds = {name: sorted(by_kind(docs)) for name, docs in rendered.items()}
    assert kinds["default"] == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    assert kinds["gpu"] == kinds["default"]
    assert kinds["autoscaling"] == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                    "Service", "ServiceAccount", "ServiceMonitor"]
    assert set(kinds["everything"]) == set(kinds["autoscaling"]) | {"Ingress", "Secret"}


# ---------------------------------------------------------------- values.schema.json

@pytest.mark.parametrize("args, complaint", [
    (["--set-string", "replicaCount=two"], "replicaCount"),
    (["--set", "replicaCount=two"], "replicaCount"),
    (["--set", "replicaCunt=2"], "replicaCunt"),
    (["--set", "model.source=s3"], "source"),
    (["--set", "gpu.count=-1"], "count"),
    (["--set", "config.port=9000"], "port"),  # the chart owns the port (probes, Service)
    (["--set", "autoscaling.targetWaitingRequests=lots"], "targetWaitingRequests"),
])
def test_values_schema_rejects_wrong_values(args, complaint):
    proc = helm("template", "dspark", str(CHART), *args, check=False)
    assert proc.returncode != 0, f"helm accepted {args}"
    assert "schema" in proc.stderr and complaint in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, complaint", [
    (["--set", "model.source=pvc"], "claimName"),
    (["--set", "model.source=hostPath"], "hostPath.path"),
    (["--set", "model.source=initContainer"], "initContainer.image"),
    (["--set", "podDisruptionBudget.minAvailable=1"], "only one"),
])
def test_incomplete_settings_fail_with_a_message(args, complaint):
    proc = helm("template", "dspark", str(CHART), *args, check=False)
    assert proc.returncode != 0 and complaint in proc.stderr, proc.stderr


# ---------------------------------------------------------------- what the Deployment promises

def test_probes_hit_health_and_startup_allows_the_model_to_load(rendered):
    for name in ("default", "gpu"):
        c = container(rendered[name])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
        startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        assert startup >= 120, name
    assert container(rendered["gpu"])["startupProbe"]["failureThreshold"] > container(rendered["default"])["startupProbe"]["failureThreshold"]


def test_pod_runs_non_root_on_a_read_only_root_filesystem(rendered):
    for name, docs in rendered.items():
        spec = pod_spec(docs)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        cache_dir = env_of(spec["containers"][0])["DSPARK_CACHE_DIR"]["value"]
        for path in ("/tmp", cache_dir, "/home/dspark/.cache"):
            assert "emptyDir" in volumes[mounts[path]], (name, path)


def test_termination_grace_covers_the_servers_drain(rendered):
    for name, docs in rendered.items():
        spec = pod_spec(docs)
        server_config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
        pre_stop = int(spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
        drain = server_config["shutdown-grace-period"]
        # The drain, then up to 5 s of aborts and 5 s of uvicorn shutdown, plus the engine's stop.
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 10, name
    gpu = pod_spec(rendered["gpu"])
    assert gpu["terminationGracePeriodSeconds"] == 5 + 120 + 15


def test_config_map_is_the_servers_config_file(rendered, tmp_path):
    from dspark_serve.server.cli import build_parser
    from dspark_serve.server.serve import resolve_serve_args

    for name, docs in rendered.items():
        c = container(docs)
        assert c["args"][:2] == ["--config", "/etc/dspark/config.yaml"]
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/dspark")
        volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
        text = one(docs, "ConfigMap")["data"]["config.yaml"]
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        # The real `dspark serve` settings parser takes every key and value (it exits on a bad one).
        try:
            resolved = resolve_serve_args(build_parser().parse_args(["serve", "--config", str(path)]), {})
        except SystemExit:
            pytest.fail(f"dspark serve rejects the {name} config:\n{text}")
        assert resolved.port == c["ports"][0]["containerPort"] == 8000
        assert resolved.shutdown_grace_period == yaml.safe_load(text)["shutdown-grace-period"]
        if name == "gpu":
            assert resolved.device == "cuda" and resolved.kv_cache_memory is None


def test_default_serves_the_embedded_model_with_a_seeded_cache(rendered):
    docs = rendered["default"]
    c = container(docs)
    assert "DSPARK_MODEL" not in env_of(c)
    seed = pod_spec(docs)["initContainers"][0]
    assert seed["image"] == c["image"]
    assert "DSPARK_CACHE_DIR" in " ".join(seed["command"])
    assert c["resources"]["limits"]["memory"] == "2Gi"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_gpu_values_ask_for_one_gpu_and_mount_the_model(rendered):
    docs = rendered["gpu"]
    c, spec = container(docs), pod_spec(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith("-cuda")
    assert env_of(c)["DSPARK_MODEL"]["value"] == "/models/Qwen3-8B"
    model = next(v for v in spec["volumes"] if v["name"] == "model")
    assert model["persistentVolumeClaim"] == {"claimName": "dspark-models", "readOnly": True}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"]
    assert "initContainers" not in spec
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert "kv-cache-memory" not in config  # null in values-gpu.yaml removes the CPU default


def test_autoscaling_scales_on_waiting_requests(rendered):
    docs = rendered["autoscaling"]
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": one(docs, "Deployment")["metadata"]["name"]}
    assert hpa["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": "dspark_num_requests_waiting"},
                                                       "target": {"type": "AverageValue", "averageValue": "4"}}}]
    assert "replicas" not in one(docs, "Deployment")["spec"]  # the HPA owns it
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["endpoints"][0]["port"] == "http" and sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= one(docs, "Service")["metadata"]["labels"].items()
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_service_and_ingress_reach_the_http_port(rendered):
    docs = rendered["everything"]
    svc = one(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    backend = one(docs, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": svc["metadata"]["name"], "port": {"name": "http"}}


def test_api_key_comes_from_a_secret():
    docs = helm_template("--set", "apiKey.value=s3cret")
    secret = one(docs, "Secret")
    ref = env_of(container(docs))["DSPARK_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "api-key"}
    assert "checksum/api-key" in one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]

    docs = helm_template("--set", "apiKey.existingSecret=team-keys", "--set", "apiKey.existingSecretKey=dspark")
    assert "Secret" not in by_kind(docs)
    assert env_of(container(docs))["DSPARK_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-keys", "key": "dspark"}

    assert "DSPARK_API_KEY" not in env_of(container(helm_template()))


@pytest.mark.parametrize("args, volume_kind", [
    (["--set", "model.source=hostPath", "--set", "model.hostPath.path=/srv/models", "--set", "model.path=/models/m.gguf"],
     "hostPath"),
    (["--set", "model.source=initContainer", "--set", "model.initContainer.image=busybox:1.36",
      "--set-json", 'model.initContainer.command=["sh","-c","cp -r /weights/. /models/"]'], "emptyDir"),
])
def test_other_model_sources(args, volume_kind):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = helm_template(*args)
    spec = pod_spec(docs)
    model = next(v for v in spec["volumes"] if v["name"] == "model")
    assert volume_kind in model
    assert "DSPARK_MODEL" in env_of(spec["containers"][0])
    if volume_kind == "emptyDir":
        fetch = next(c for c in spec["initContainers"] if c["name"] == "fetch-model")
        assert {"name": "model", "mountPath": "/models"} in fetch["volumeMounts"]
    kv.validate(one(docs, "Deployment"), KUBERNETES_VERSIONS[-1], strict=True)


def test_release_notes_tell_how_to_call_the_server():
    notes = helm("install", "dspark-serve", str(CHART), "--dry-run=client", "-n", "inference").stdout
    notes = notes[notes.index("NOTES:"):]
    assert "port-forward svc/dspark-serve 8000:8000" in notes
    assert "WARNING: no API key" in notes and "Authorization" not in notes
    notes = helm("install", "dspark-serve", str(CHART), "--dry-run=client", "-n", "inference",
                 "--set", "apiKey.existingSecret=team-keys").stdout
    notes = notes[notes.index("NOTES:"):]
    assert "get secret team-keys" in notes and 'Authorization: Bearer $DSPARK_API_KEY' in notes
    assert "WARNING" not in notes
