"""`dyngate deploy kubernetes`: every overlay rendered by the real `kubectl kustomize` and every object validated
against the Kubernetes schemas (kubernetes-validate, strict); ports, names, probes, secrets and image pins
checked against the settings the local commands use and the running environment. No cluster is needed.

Fixture from tests/conftest.py: `text_repository` (fp32 + torchscript of distilbert-tiny, both flavours).
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from dyngate_build.errors import ConfigError, DyngateError
from dyngate_build.repository import list_models
from dyngate_deploy import image
from dyngate_deploy.kubernetes import (COMPONENT, DeployOptions, gateway_port, read_repository, triton_ports,
                                       write_kubernetes)

SECRET = "pw-k8s-Zq8x-never-in-a-manifest"
KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def kubectl():
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` renders the overlays (the CI image has it)")
    return KUBECTL


@pytest.fixture(scope="module")
def deployed(text_repository, tmp_path_factory):
    """The manifests for `text_repository` (PVC store), written while a login is set in this environment."""
    out = tmp_path_factory.mktemp("deploy") / "k8s"
    old = {k: os.environ.get(k) for k in ("DYNGATE_GATEWAY_USER", "DYNGATE_GATEWAY_PASSWORD")}
    os.environ.update(DYNGATE_GATEWAY_USER="ada", DYNGATE_GATEWAY_PASSWORD=SECRET)
    try:
        write_kubernetes(DeployOptions(repository=text_repository, out=out), log=lambda *a: None)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return out


def render(kubectl: str, folder: Path) -> list[dict]:
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def with_component(out: Path) -> Path:
    """An overlay of the cpu overlay plus the queue-time component, as a user would add it."""
    folder = out / "overlays" / "cpu-queue-time"
    folder.mkdir(exist_ok=True)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../cpu"],
        "components": [f"../../components/{COMPONENT}"]}))
    return folder


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [(o["kind"], o["metadata"]["name"]) for o in objects])
    return found[0]


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


# ------------------------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("overlay", ["cpu", "gpu", "cpu-queue-time"])
def test_every_overlay_renders_and_every_object_validates(deployed, kubectl, overlay):
    import kubernetes_validate

    folder = with_component(deployed) if overlay == "cpu-queue-time" else deployed / "overlays" / overlay
    objects = render(kubectl, folder)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ConfigMap", "Deployment", "Deployment", "Service", "Service", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "PodDisruptionBudget", "PersistentVolumeClaim"]), kinds
    for obj in objects:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)  # raises if invalid
    broken = copy.deepcopy(one(objects, "Deployment", "dyngate-triton"))
    container(broken)["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"  # a typo strict mode refuses
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)
    hpa = one(objects, "HorizontalPodAutoscaler", "dyngate-triton")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    if overlay == "cpu-queue-time":
        assert metrics["Pods"]["pods"]["metric"]["name"] == "triton_queue_time_per_request_us"
        rules = yaml.safe_load((deployed / "components" / COMPONENT / "prometheus-adapter-rules.yaml").read_text())
        assert rules["rules"][0]["name"]["as"] == "triton_queue_time_per_request_us"
        assert "nv_inference_queue_duration_us" in rules["rules"][0]["metricsQuery"]
    else:
        assert "Pods" not in metrics


def test_service_ports_match_container_ports_and_local_defaults(deployed, kubectl):
    objects = render(kubectl, deployed / "overlays" / "cpu")
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        (deployment,) = [d for d in objects if d["kind"] == "Deployment"
                         and d["spec"]["template"]["metadata"]["labels"].items() >= selector.items()]
        ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        for port in service["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"], (service["metadata"]["name"], port)
    triton = one(objects, "Service", "dyngate-triton")
    assert {p["name"]: p["port"] for p in triton["spec"]["ports"]} == triton_ports() == {
        "http": 8000, "grpc": 8001, "metrics": 8002}  # what `dyngate serve` listens on
    gateway = one(objects, "Service", "dyngate-gateway")
    assert [p["port"] for p in gateway["spec"]["ports"]] == [gateway_port()] == [7860]
    assert gateway["spec"]["sessionAffinity"] == "ClientIP"  # a Gradio session stays on one gateway replica


def test_gateway_reaches_triton_by_its_service_name(deployed, kubectl):
    objects = render(kubectl, deployed / "overlays" / "cpu")
    args = container(one(objects, "Deployment", "dyngate-gateway"))["args"]
    flags = dict(zip(args[1::2], args[2::2]))
    host, port = flags["--triton"].split(":")
    triton = one(objects, "Service", "dyngate-triton")
    ports = {p["name"]: p["port"] for p in triton["spec"]["ports"]}
    assert host == triton["metadata"]["name"] and int(port) == ports["grpc"]
    assert flags["--triton-http"] == f"{triton['metadata']['name']}:{ports['http']}"  # inference over HTTP
    assert flags["--metrics-url"] == f"http://{triton['metadata']['name']}:{ports['metrics']}/metrics"
    # the catalog the gateway reads is the repository's own model folders (config.pbtxt + metadata.json)
    catalog = one(objects, "Deployment", "dyngate-gateway")["spec"]["template"]["spec"]["volumes"][0]["configMap"]
    config_map = [o for o in objects if o["kind"] == "ConfigMap"][0]
    assert catalog["name"] == config_map["metadata"]["name"]  # kustomize's hashed name, rewritten in both
    assert {i["key"] for i in catalog["items"]} == set(config_map["data"])


def test_triton_probes_models_and_shared_memory(deployed, kubectl, text_repository):
    entries = list_models(text_repository)
    python = {e.name for e in entries if e.backend == "python"}
    for overlay, expected in (("cpu", python), ("gpu", {e.name for e in entries})):
        deployment = one(render(kubectl, deployed / "overlays" / overlay), "Deployment", "dyngate-triton")
        triton = container(deployment)
        assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert "--model-control-mode=explicit" in triton["args"]
        loaded = {a.split("=", 1)[1] for a in triton["args"] if a.startswith("--load-model=")}
        assert loaded == expected, overlay
        assert "--model-repository=/models" in triton["args"]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        assert int(volumes["shm"]["emptyDir"]["sizeLimit"].removesuffix("Mi")) >= 16 * len(python)
        assert {m["mountPath"] for m in triton["volumeMounts"]} == {"/dev/shm", "/models"}
        assert triton["resources"]["requests"]["cpu"] and triton["resources"]["requests"]["memory"]
        assert ("nvidia.com/gpu" in triton["resources"].get("limits", {})) == (overlay == "gpu")


def test_no_secret_value_in_any_manifest(deployed, kubectl):
    texts = [p.read_text(errors="replace") for p in deployed.rglob("*") if p.is_file()]
    texts += [yaml.safe_dump_all(render(kubectl, deployed / "overlays" / o)) for o in ("cpu", "gpu")]
    assert not any(SECRET in t for t in texts)
    objects = render(kubectl, deployed / "overlays" / "cpu")
    assert not [o for o in objects if o["kind"] == "Secret"]
    env = {e["name"]: e for e in container(one(objects, "Deployment", "dyngate-gateway"))["env"]}
    for name, key in (("DYNGATE_GATEWAY_USER", "user"), ("DYNGATE_GATEWAY_PASSWORD", "password")):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "dyngate-gateway-login", "key": key}


def test_dockerfiles_pin_the_installed_versions_on_the_embedded_servers_release(deployed):
    marker = yaml.safe_load((deployed / ".dyngate-deploy").read_text())
    assert marker["triton"].startswith("2.51.")  # nvidia-pytriton 0.7 embeds Triton 2.51
    expected = {"numpy", "onnxruntime", "pillow", "tokenizers", "torch"}  # what runtime.py / model.py import
    for device in ("cpu", "gpu"):
        text = (deployed / "overlays" / device / "Dockerfile").read_text()
        assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:24\.10-py3$", text, re.M), text
        pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)", text))
        if device == "gpu":
            pins["onnxruntime"] = pins.pop("onnxruntime-gpu")
        assert set(pins) == expected, pins
        for name, version in pins.items():
            installed = metadata.version(name).split("+")[0]  # torch "2.13.0+cpu": the index picks the build
            assert version == installed, (device, name, version, installed)


@pytest.mark.parametrize("server, tag", [("2.40.0", "23.11"), ("2.51.0", "24.10"), ("2.53.1", "24.12"),
                                         ("2.54.0", "25.01")])
def test_container_release_of_a_server_version(server, tag):
    assert image.container_tag(server) == tag


def test_object_store_repository(text_repository, tmp_path, kubectl):
    import kubernetes_validate

    out = tmp_path / "k8s"
    write_kubernetes(DeployOptions(repository=text_repository, out=out, overlays=("cpu",), triton_version="2.51.0",
                                   model_store="s3://models-bucket/dyngate", namespace="serving"),
                     log=lambda *a: None)
    assert not (out / "overlays" / "gpu").exists()
    objects = render(kubectl, out / "overlays" / "cpu")
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert all(o["metadata"]["namespace"] == "serving" for o in objects)
    triton = container(one(objects, "Deployment", "dyngate-triton"))
    assert "--model-repository=s3://models-bucket/dyngate" in triton["args"]
    assert triton["envFrom"] == [{"secretRef": {"name": "dyngate-model-store", "optional": True}}]
    for obj in objects:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", ["overlay", "missing", "empty", "http", "ftp", "bucketless", "name", "memory",
                                  "cpu", "memory-zero", "memory-no-unit", "memory-milli", "gateway-memory-no-unit",
                                  "memory-not-above-shm", "registry-space", "registry-uppercase-path",
                                  "registry-scheme"])
def test_bad_input_is_a_typed_error_and_nothing_is_written(case, text_repository, tmp_path):
    empty = tmp_path / "empty-repo"
    empty.mkdir()
    settings = {"overlay": {"overlays": ("cpu", "arm")}, "missing": {"repository": tmp_path / "nope"},
                "empty": {"repository": empty}, "http": {"model_store": "http://example.com/models"},
                "ftp": {"model_store": "ftp://host/models"}, "bucketless": {"model_store": "s3://"},
                "name": {"name": "Dyn_Gate"}, "memory": {"triton_memory": "lots"},
                "cpu": {"gateway_cpu": "2 cores"}, "memory-zero": {"triton_memory": "0"},
                "memory-no-unit": {"triton_memory": "512"}, "memory-milli": {"triton_memory": "512m"},
                "gateway-memory-no-unit": {"gateway_memory": "1024"},
                "memory-not-above-shm": {"triton_memory": "shm"}, "registry-space": {"registry": "bad reg"},
                "registry-uppercase-path": {"registry": "registry.example.com/Team"},
                "registry-scheme": {"registry": "https://registry.example.com/team"}}[case]
    shm = f"{math.ceil(read_repository(text_repository).shm_bytes / 2**20 / 64) * 64}Mi"  # the manifest's sizeLimit
    if settings.get("triton_memory") == "shm":  # equal to the /dev/shm volume: not above it
        settings = {"triton_memory": shm}
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(ConfigError) as error:
        write_kubernetes(DeployOptions(**{"repository": text_repository, "out": parent / "k8s",
                                          "triton_version": "2.51.0", **settings}), log=lambda *a: None)
    message = str(error.value)
    word = {"overlay": "arm", "missing": "nope", "empty": "no python-backend variant", "http": "http://",
            "ftp": "ftp://", "bucketless": "s3://", "name": "Dyn_Gate", "memory": "--triton-memory='lots'",
            "cpu": "--gateway-cpu='2 cores'", "memory-zero": "--triton-memory='0' has no memory unit",
            "memory-no-unit": "--triton-memory='512' has no memory unit (Kubernetes reads it as 512 bytes)",
            "memory-milli": "thousandths of a byte", "gateway-memory-no-unit": "--gateway-memory='1024' has no memory",
            "memory-not-above-shm": f"--triton-memory='{shm}' is not above the python backend's shared memory for "
                                    f"this repository ({shm}, the /dev/shm volume",
            "registry-space": "--registry 'bad reg' is no image registry/repository prefix",
            "registry-uppercase-path": "'registry.example.com/Team'",
            "registry-scheme": "without spaces or a scheme"}[case]
    if case.startswith(("memory", "gateway-memory")) and case != "memory-not-above-shm":
        assert "512Mi" in message and "CPU" not in message and "500m" not in message, message  # a memory example
    assert word in message and ("choose" in message or "use" in message or "build" in message), message
    assert list(parent.iterdir()) == []  # no output, no staging folder left behind


def test_existing_folder_of_other_files_is_never_overwritten(text_repository, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="was not written by"):
        write_kubernetes(DeployOptions(repository=text_repository, out=out, triton_version="2.51.0"),
                         log=lambda *a: None)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_cli_writes_and_reports_bad_input(text_repository, tmp_path, capsys):
    from dyngate_cli import main

    out = tmp_path / "k8s"
    assert main(["deploy", "kubernetes", "--repository", str(text_repository), "--out", str(out),
                 "--triton-version", "2.51.0", "--overlay", "cpu"]) == 0
    assert (out / "overlays" / "cpu" / "kustomization.yaml").is_file()
    assert main(["deploy", "kubernetes", "--repository", str(text_repository), "--out", str(tmp_path / "x"),
                 "--model-store", "hdfs://cluster/models"]) == 2
    err = capsys.readouterr().err
    assert "error: --model-store='hdfs://cluster/models' is not supported" in err
    assert main(["deploy", "kubernetes", "--repository", str(text_repository), "--out", str(tmp_path / "x"),
                 "--triton-memory", "lots"]) == 2  # found in a trial: written unchecked into the manifests
    assert "error: --triton-memory='lots' is not a Kubernetes quantity" in capsys.readouterr().err
    assert main(["deploy", "kubernetes", "--repository", str(text_repository), "--out", str(tmp_path / "x"),
                 "--triton-memory", "512"]) == 2  # found by a new user: 512 bytes
    assert "error: --triton-memory='512' has no memory unit" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert issubclass(ConfigError, DyngateError)
