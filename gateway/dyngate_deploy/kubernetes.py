"""`dyngate deploy kubernetes`: a Kustomize base plus `cpu` and `gpu` overlays for one model repository.

    write_kubernetes(DeployOptions(repository=Path("model_repository"), out=Path("deploy/k8s")))
    kubectl apply -k deploy/k8s/overlays/cpu

What is written (DIR = `out`):

    DIR/base/                 Triton Deployment + Service (http, grpc, metrics) + HPA (CPU) + PDB; the gateway
                              Deployment + Service + PDB; the model repository's PVC (unless an object store
                              is named); the gateway's catalog (config.pbtxt + metadata.json of every model,
                              as a generated ConfigMap: the gateway reads the repository's metadata, never
                              its graphs)
    DIR/overlays/cpu|gpu/     the Triton image and resources per device; `Dockerfile` of that image
    DIR/components/queue-time-hpa/   optional Kustomize component: the HPA also scales on Triton's queue time
                              per request, a Pods metric served by a Prometheus adapter (its rule beside it)
    DIR/gateway.Dockerfile    the gateway's image, built from the dyngate source tree

Names, ports and environment variable names are the ones the local commands use: Triton's ports are the
defaults of `dyngate_serving.launcher.TritonServerConfig` (`dyngate serve`), the gateway's port is
`dyngate_gateway.config.DEFAULT_PORT`, the login variables are `dyngate_gateway.config.USER_ENV` /
`PASSWORD_ENV`, the Triton model names are the repository's folders. The login itself is read from a
Kubernetes Secret (`secretKeyRef`) that the user creates; no secret value is ever written.

Bad input (an unknown overlay, a repository that does not exist or holds no model, an object-store URL Triton
cannot read, a memory request without a unit or not above the /dev/shm volume) raises a ConfigError before
anything is written; everything is written into a temporary folder beside `out` and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from dyngate_build.errors import ConfigError
from dyngate_build.metadata import METADATA_FILE
from dyngate_build.repository import CONFIG_FILE, RepositoryEntry, directory_size, list_models, newest_version_dir
from dyngate_build.repository import read_config
from dyngate_build.runtime import RuntimeSpec
from dyngate_deploy import image

# A Kubernetes resource quantity (apimachinery's resource.Quantity grammar, without a sign): a decimal number and
# a binary (Ki..Ei), decimal (m, k, M..E) or exponent (e3, E-2) suffix.
_QUANTITY = re.compile(r"\+?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?")
# The suffixes that make a quantity a memory size (a bare number is bytes, `m` thousandths of a byte)
BYTE_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
              "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_MEMORY_SHAPE = ("a number with a unit: Ki, Mi, Gi, Ti (powers of 2) or k, M, G, T (powers of 10), e.g. 512Mi "
                 "or 2Gi")
OVERLAYS = ("cpu", "gpu")
STORE_SCHEMES = ("s3", "gs", "as")  # object stores tritonserver reads a repository from itself
PVC = "pvc"
MODELS_MOUNT, CATALOG_MOUNT = "/models", "/catalog"
MARKER = ".dyngate-deploy"  # a folder holding this file was written here and may be replaced
QUEUE_TIME_METRIC = "triton_queue_time_per_request_us"
COMPONENT = "queue-time-hpa"
MiB = 2**20
# Python backend shared memory: each model instance (a stub process) starts with a region of this size and
# grows it while tensors need more; the volume holds every instance's start plus its largest batch in flight.
SHM_DEFAULT_BYTES = 16 * MiB
# Resident memory of one python-backend instance beyond its graph, from what was measured here (DESIGN.md):
# onnxruntime ~57 MB + tokenizers ~18 MB; torch ~240 MB (TorchScript variants). The server itself: 256 MiB.
INSTANCE_BYTES = {"onnxruntime": 128 * MiB, "torchscript": 320 * MiB}
SERVER_BYTES = 256 * MiB
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# An image name as distribution/reference (the grammar docker, containerd and registries parse) reads one: an
# optional registry host (domain components or a bracketed IPv6 address, optional :port), then lowercase path
# components separated by '/'. `--registry` is checked as the prefix of such a name.
_HOST_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_NAME = re.compile(rf"(?:(?:{_HOST_PART}(?:\.{_HOST_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?/)?"
                         rf"{_PATH_PART}(?:/{_PATH_PART})*")
_IMAGE_NAME_MAX = 255  # characters of an image name (distribution/reference's NameTotalLengthMax)


# ------------------------------------------------------------------------------------------------- settings

def triton_ports() -> dict[str, int]:
    """Port name -> number of Triton's endpoints, the defaults of `dyngate serve` (TritonServerConfig)."""
    from dyngate_serving.launcher import TritonServerConfig

    defaults = TritonServerConfig(repository=Path(MODELS_MOUNT))
    return {"http": defaults.http_port, "grpc": defaults.grpc_port, "metrics": defaults.metrics_port}


def gateway_port() -> int:
    """The gateway's port, the default of `dyngate gateway`."""
    from dyngate_gateway.config import DEFAULT_PORT

    return DEFAULT_PORT


@dataclass
class DeployOptions:
    """What `dyngate deploy kubernetes` writes.

    repository: the local model repository (its models are the Triton models loaded; its metadata is the
    gateway's catalog). out: the folder to write. overlays: which of OVERLAYS to write.
    model_store: "pvc" (a PersistentVolumeClaim `<name>-models` mounted at /models) or an object-store URL
    Triton reads itself (s3://bucket/path, gs://bucket/path, as://account/container/path).
    name: prefix of every object (a DNS label). namespace: the namespace set on every object (None: kubectl's).
    registry: prefix of the image names ("" keeps `<name>-triton` / `<name>-gateway`).
    triton_replicas / triton_max_replicas: the HPA's range. gateway_replicas: fixed gateway replicas.
    triton_cpu / gateway_cpu: CPU requests (Kubernetes quantities). triton_memory: memory request (None:
    from the repository, see `triton_memory_bytes`). gateway_memory: memory request.
    cpu_target_percent: the HPA's average CPU utilisation target. queue_time_target_ms: the component's
    average queue time per request target. triton_version: Triton server version of the image (None: the
    embedded server's, asked at run time). login_secret: the Secret holding the gateway's `user` and
    `password` keys (None: `<name>-gateway-login`).
    """

    repository: Path
    out: Path
    overlays: tuple[str, ...] = OVERLAYS
    model_store: str = PVC
    name: str = "dyngate"
    namespace: str | None = None
    registry: str = ""
    triton_replicas: int = 2
    triton_max_replicas: int = 8
    gateway_replicas: int = 2
    triton_cpu: str = "2"
    triton_memory: str | None = None
    gateway_cpu: str = "500m"
    gateway_memory: str = "1Gi"
    cpu_target_percent: int = 70
    queue_time_target_ms: float = 50.0
    triton_version: str | None = None
    login_secret: str | None = None

    def __post_init__(self):
        self.repository, self.out = Path(self.repository), Path(self.out)
        self.overlays = tuple(self.overlays)
        unknown = [o for o in self.overlays if o not in OVERLAYS]
        if unknown or not self.overlays:
            raise ConfigError(f"--overlay {', '.join(unknown) or '(none)'} is not known; choose from: "
                              f"{', '.join(OVERLAYS)}")
        for key in ("name", "namespace", "login_secret"):
            value = getattr(self, key)
            if value is not None and (not _DNS_NAME.fullmatch(value) or len(value) > 40):
                raise ConfigError(f"{key}={value!r} is not a Kubernetes name; use lowercase letters, digits and '-', "
                                  "starting and ending with a letter or digit, at most 40 characters")
        if self.registry and not all(_IMAGE_NAME.fullmatch(_image_name(self, part)) and
                                     len(_image_name(self, part)) <= _IMAGE_NAME_MAX for part in ("triton", "gateway")):
            raise ConfigError(f"--registry {self.registry!r} is no image registry/repository prefix; use "
                              "[HOST[:PORT]/]PATH without spaces or a scheme, the path in lowercase letters, digits "
                              "and . _ - separated by /, e.g. registry.example.com/team or localhost:5000/dyngate")
        store_scheme(self.model_store)
        for key in ("triton_cpu", "gateway_cpu"):
            value = getattr(self, key)
            if not _QUANTITY.fullmatch(str(value)):
                raise ConfigError(f"--{key.replace('_', '-')}={value!r} is not a Kubernetes quantity; use CPU cores "
                                  "as a number or millicores, e.g. 2, 0.5 or 500m")
        for key in ("triton_memory", "gateway_memory"):
            if getattr(self, key) is not None:
                memory_bytes(f"--{key.replace('_', '-')}", getattr(self, key))
        if not 1 <= self.triton_replicas <= self.triton_max_replicas:
            raise ConfigError(f"triton_replicas={self.triton_replicas} must be >= 1 and <= triton_max_replicas="
                              f"{self.triton_max_replicas}")
        if self.gateway_replicas < 1:
            raise ConfigError(f"gateway_replicas={self.gateway_replicas} must be >= 1")
        if not 1 <= self.cpu_target_percent <= 100:
            raise ConfigError(f"cpu_target_percent={self.cpu_target_percent} must be in [1, 100]")
        if not self.queue_time_target_ms > 0:
            raise ConfigError(f"queue_time_target_ms={self.queue_time_target_ms} must be > 0")

    @property
    def secret(self) -> str:
        return self.login_secret or f"{self.name}-gateway-login"

    def object_name(self, part: str) -> str:
        return f"{self.name}-{part}"


def memory_bytes(field: str, value: str) -> float:
    """Bytes of a Kubernetes memory quantity with a unit: "512Mi" -> 536870912.0, "2G" -> 2e9.

    Raises ConfigError naming `field` and the value for what is no quantity, a quantity without a byte unit
    (Kubernetes reads "512" as 512 bytes and "512m" as thousandths of a byte: never what was meant), or zero."""
    match = _QUANTITY.fullmatch(str(value))
    if not match:
        raise ConfigError(f"{field}={value!r} is not a Kubernetes quantity; use {_MEMORY_SHAPE}")
    unit = match.group(3)
    if unit not in BYTE_UNITS:
        read_as = {None: f"{match.group(1)} bytes", "m": f"{match.group(1)} thousandths of a byte"}.get(
            unit, f"{value} bytes, an exponent")
        raise ConfigError(f"{field}={value!r} has no memory unit (Kubernetes reads it as {read_as}); use "
                          f"{_MEMORY_SHAPE}")
    size = float(match.group(1)) * BYTE_UNITS[unit]
    if size <= 0:
        raise ConfigError(f"{field}={value!r} is zero; use {_MEMORY_SHAPE}")
    return size


def check_triton_memory(options: DeployOptions, facts: RepositoryFacts) -> None:
    """ConfigError when `options.triton_memory` is not above the python backend's shared memory, the /dev/shm
    volume written for the repository (`facts.shm_bytes`, a memory-backed emptyDir that counts against the pod's
    memory): the stubs would be out of memory before Triton holds a graph."""
    if options.triton_memory is None:
        return
    shm = _mebibytes(facts.shm_bytes)  # as the manifest's sizeLimit says it
    if memory_bytes("--triton-memory", options.triton_memory) <= int(shm.removesuffix("Mi")) * MiB:
        raise ConfigError(f"--triton-memory={options.triton_memory!r} is not above the python backend's shared "
                          f"memory for this repository ({shm}, the /dev/shm volume, which counts against the pod's "
                          f"memory); use more than {shm}, e.g. {_mebibytes(facts.memory_bytes)} (the estimate from "
                          "the repository's variants, used when --triton-memory is left out)")


def store_scheme(model_store: str) -> str:
    """"pvc" or the URL's scheme; ConfigError for anything Triton cannot read a repository from."""
    if model_store == PVC:
        return PVC
    scheme, sep, rest = model_store.partition("://")
    if not sep or scheme not in STORE_SCHEMES or not rest.strip("/"):
        raise ConfigError(f"--model-store={model_store!r} is not supported: use {PVC!r} (a PersistentVolumeClaim) "
                          f"or an object-store URL Triton reads itself: "
                          f"{', '.join(s + '://bucket/path' for s in STORE_SCHEMES)}")
    return scheme


# ------------------------------------------------------------------------------------------- the repository

@dataclass
class RepositoryFacts:
    """What the manifests need to know about the repository: its models and what serving them costs."""

    models: list[RepositoryEntry]
    python_instances: int  # python-backend model instances (stub processes) over all models
    shm_bytes: int  # the python backend's shared-memory volume
    memory_bytes: int  # Triton's memory request
    size_bytes: int  # the repository on disk


def read_repository(repository: Path) -> RepositoryFacts:
    """The repository's models and sizing; ConfigError when it is missing or holds no model."""
    from dyngate_gateway.handlers import Limits

    if not repository.is_dir():
        raise ConfigError(f"--repository {str(repository)!r} is not a directory; build one with `dyngate build` "
                          "or pass the folder that holds the model folders")
    models = list_models(repository)
    if not any(m.backend == "python" for m in models):
        raise ConfigError(f"--repository {str(repository)!r} holds no python-backend variant (no "
                          f"<model>__<variant>/{CONFIG_FILE} with backend python; it holds "
                          f"{', '.join(m.name for m in models) or 'nothing'}); build variants into it with "
                          "`dyngate build` first")
    limits = Limits()
    instances, shm, memory = 0, 0, SERVER_BYTES
    for entry in models:
        config = read_config(entry.folder)
        count = sum(max(1, g.count) for g in config.instance_group) or 1
        graph = directory_size(newest_version_dir(entry.folder))
        memory += count * graph
        if entry.backend != "python":
            continue
        spec = RuntimeSpec.load(str(newest_version_dir(entry.folder)))
        item = limits.max_image_bytes if spec.client_input == "IMAGE" else 4 * limits.max_text_chars
        instances += count
        shm += count * (SHM_DEFAULT_BYTES + max(1, config.max_batch_size) * item)
        memory += count * INSTANCE_BYTES.get(spec.engine, INSTANCE_BYTES["torchscript"])
    return RepositoryFacts(models=models, python_instances=instances, shm_bytes=shm, memory_bytes=memory + shm,
                           size_bytes=directory_size(repository))


def _mebibytes(value: int) -> str:
    return f"{math.ceil(value / MiB / 64) * 64}Mi"  # whole 64 MiB steps


def _gibibytes(value: int) -> str:
    return f"{max(1, math.ceil(value / 2**30))}Gi"


# ------------------------------------------------------------------------------------------------ the objects

def _labels(options: DeployOptions, component: str) -> dict:
    return {"app.kubernetes.io/name": options.name, "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "dyngate"}


def _meta(options: DeployOptions, part: str, component: str) -> dict:
    return {"name": options.object_name(part), "labels": _labels(options, component)}


def triton_objects(options: DeployOptions, facts: RepositoryFacts) -> dict[str, dict]:
    """File name -> object: Triton's Deployment, Service, HPA, PDB (and PVC)."""
    ports = triton_ports()
    name, labels = options.object_name("triton"), _labels(options, "triton")
    selector = {k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/component")}
    pvc = store_scheme(options.model_store) == PVC
    args = [f"--model-repository={MODELS_MOUNT if pvc else options.model_store}",
            "--model-control-mode=explicit",
            *[f"--load-model={m.name}" for m in facts.models if m.backend == "python"],
            f"--http-port={ports['http']}", f"--grpc-port={ports['grpc']}", f"--metrics-port={ports['metrics']}",
            "--allow-metrics=true",
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            "--exit-timeout-secs=30"]
    mounts = [{"name": "shm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": _mebibytes(facts.shm_bytes)}}]
    container = {
        "name": "tritonserver", "image": options.object_name("triton"),
        "command": ["tritonserver"], "args": args,
        "ports": [{"name": port, "containerPort": number, "protocol": "TCP"} for port, number in ports.items()],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5,
                           "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        # loading every variant (python stubs import onnxruntime/torch) may take minutes on a cold node
        "startupProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10,
                         "failureThreshold": 60},
        "resources": {"requests": {"cpu": options.triton_cpu,
                                   "memory": options.triton_memory or _mebibytes(facts.memory_bytes)}},
        "volumeMounts": mounts,
    }
    if pvc:
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": options.object_name("models"),
                                                                    "readOnly": True}})
    else:  # credentials for the object store, when the cluster does not give them by workload identity
        container["envFrom"] = [{"secretRef": {"name": options.object_name("model-store"), "optional": True}}]
    deployment = _deployment(name, labels, selector, options.triton_replicas, ports["metrics"],
                             {"containers": [container], "volumes": volumes, "terminationGracePeriodSeconds": 45})
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
        "spec": {"selector": selector, "ports": [{"name": port, "port": number, "targetPort": port, "protocol": "TCP"}
                                                 for port, number in ports.items()]},
    }
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": options.triton_replicas, "maxReplicas": options.triton_max_replicas,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                "type": "Utilization", "averageUtilization": options.cpu_target_percent}}}],
        },
    }
    objects = {"triton-deployment.yaml": deployment, "triton-service.yaml": service, "triton-hpa.yaml": hpa,
               "triton-pdb.yaml": _pdb(options, "triton", selector)}
    if pvc:
        objects["model-repository-pvc.yaml"] = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(options, "models", "triton"),
            # every Triton replica mounts it; a rebuild adds a version folder beside the served one: twice the size
            "spec": {"accessModes": ["ReadWriteMany"],
                     "resources": {"requests": {"storage": _gibibytes(2 * facts.size_bytes)}}},
        }
    return objects


def gateway_objects(options: DeployOptions, facts: RepositoryFacts) -> dict[str, dict]:
    """File name -> object: the gateway's Deployment, Service and PDB."""
    from dyngate_gateway.config import PASSWORD_ENV, USER_ENV

    port, ports = gateway_port(), triton_ports()
    triton = options.object_name("triton")  # the Triton Service's DNS name in the same namespace
    name, labels = options.object_name("gateway"), _labels(options, "gateway")
    selector = {k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/component")}
    container = {
        "name": "gateway", "image": options.object_name("gateway"),
        "args": ["gateway", "--repository", CATALOG_MOUNT, "--triton", f"{triton}:{ports['grpc']}",
                 "--triton-http", f"{triton}:{ports['http']}", "--host", "0.0.0.0", "--port", str(port),
                 "--metrics-url", f"http://{triton}:{ports['metrics']}/metrics"],
        "env": [{"name": env, "valueFrom": {"secretKeyRef": {"name": options.secret, "key": key}}}
                for env, key in ((USER_ENV, "user"), (PASSWORD_ENV, "password"))],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 10},
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 20},
        "resources": {"requests": {"cpu": options.gateway_cpu, "memory": options.gateway_memory}},
        "volumeMounts": [{"name": "catalog", "mountPath": CATALOG_MOUNT, "readOnly": True}],
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
    }
    items = [{"key": key, "path": path} for key, path in catalog_files(facts).items()]
    deployment = _deployment(name, labels, selector, options.gateway_replicas, port,
                             {"containers": [container],
                              "volumes": [{"name": "catalog", "configMap": {"name": options.object_name("catalog"),
                                                                            "items": items}}]})
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
        # Gradio's page keeps a session (queue join, then its event stream) on one process: one client, one pod
        "spec": {"selector": selector, "sessionAffinity": "ClientIP",
                 "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]},
    }
    return {"gateway-deployment.yaml": deployment, "gateway-service.yaml": service,
            "gateway-pdb.yaml": _pdb(options, "gateway", selector)}


def catalog_files(facts: RepositoryFacts) -> dict[str, str]:
    """ConfigMap key -> path under the gateway's /catalog for each model's config.pbtxt and metadata.json."""
    files = {}
    for entry in facts.models:
        for file in (CONFIG_FILE, METADATA_FILE):
            if (entry.folder / file).is_file():
                files[f"{entry.name}.{file}"] = f"{entry.name}/{file}"
    return files


def _deployment(name: str, labels: dict, selector: dict, replicas: int, metrics_port: int, pod_spec: dict) -> dict:
    """A Deployment of `replicas` pods labelled `labels`, matched by `selector`, scraped by Prometheus on
    `metrics_port` (`_scrape`), each running `pod_spec` (containers, volumes, ...): Triton's and the gateway's."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels, "annotations": _scrape(metrics_port)}, "spec": pod_spec},
        },
    }


def _pdb(options: DeployOptions, component: str, selector: dict) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(options, component, component),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector}}}


def _scrape(port: int) -> dict:
    """Pod annotations the common Prometheus scrape configs read."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


# --------------------------------------------------------------------------------------- kustomize folders

def _image_name(options: DeployOptions, part: str) -> str:
    base = options.object_name(part)
    return f"{options.registry.rstrip('/')}/{base}" if options.registry else base


def base_kustomization(options: DeployOptions, files: list[str], facts: RepositoryFacts) -> dict:
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": files,
        "configMapGenerator": [{"name": options.object_name("catalog"),
                                "files": [f"{key}=catalog/{path}" for key, path in catalog_files(facts).items()]}],
    }
    if options.namespace:
        kustomization["namespace"] = options.namespace
    return kustomization


def overlay(options: DeployOptions, facts: RepositoryFacts, device: str, version: str) -> dict[str, object]:
    """File name -> content (dict: YAML; str: text) of one overlay. Both load the python-backend variants;
    gpu also loads the native flavours and asks for one GPU per Triton pod."""
    from dyngate_build import __version__

    triton = options.object_name("triton")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../../base"],
        "images": [{"name": triton, "newName": _image_name(options, "triton"), "newTag": f"{__version__}-{device}"},
                   {"name": options.object_name("gateway"), "newName": _image_name(options, "gateway"),
                    "newTag": __version__}],
    }
    files: dict[str, object] = {"kustomization.yaml": kustomization, "Dockerfile": image.dockerfile(version, device)}
    if device == "gpu":
        patch = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": triton},
                 "spec": {"template": {"spec": {
                     "containers": [{"name": "tritonserver", "resources": {"limits": {"nvidia.com/gpu": 1}}}],
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}}}
        kustomization["patches"] = [{"path": "triton-gpu.yaml"}]
        files["triton-gpu.yaml"] = patch
        native = [{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": f"--load-model={m.name}"}
                  for m in facts.models if m.backend != "python"]
        if native:  # onnxruntime_onnx / pytorch_libtorch flavours: their configs ask for KIND_GPU
            kustomization["patches"].append({"target": {"kind": "Deployment", "name": triton},
                                             "patch": yaml.safe_dump(native, sort_keys=False)})
    return files


def queue_time_component(options: DeployOptions) -> dict[str, object]:
    """The optional component: a Pods metric (Triton's queue time per request, µs) on the Triton HPA."""
    triton = options.object_name("triton")
    metric = {"type": "Pods", "pods": {"metric": {"name": QUEUE_TIME_METRIC}, "target": {
        "type": "AverageValue", "averageValue": str(int(options.queue_time_target_ms * 1000))}}}
    component = {
        "apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component",
        "patches": [{"target": {"kind": "HorizontalPodAutoscaler", "name": triton},
                     "patch": yaml.safe_dump([{"op": "add", "path": "/spec/metrics/-", "value": metric}],
                                             sort_keys=False)}],
    }
    # prometheus-adapter (kubernetes-sigs/prometheus-adapter) rule: Triton's cumulative queue time over its
    # successful requests, per pod, as the custom metric the patch above scales on
    rules = {"rules": [{
        "seriesQuery": 'nv_inference_queue_duration_us{namespace!="",pod!=""}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": "^nv_inference_queue_duration_us$", "as": QUEUE_TIME_METRIC},
        "metricsQuery": ("sum(rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>) / "
                         "clamp_min(sum(rate(nv_inference_request_success{<<.LabelMatchers>>}[1m])) "
                         "by (<<.GroupBy>>), 0.001)"),
    }]}
    return {"kustomization.yaml": component, "prometheus-adapter-rules.yaml": rules}


def gateway_dockerfile() -> str:
    """The gateway image: this Python's minor version, dyngate installed from its source tree (the build
    context is the dyngate checkout), PyTorch's CPU wheels, an unprivileged user."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return "\n".join([
        "# The dyngate gateway. Build from the dyngate checkout: docker build -f DIR/gateway.Dockerfile .",
        f"FROM python:{python}-slim",
        "WORKDIR /src",
        "COPY pyproject.toml README.md ./",
        "COPY build build",
        "COPY gateway gateway",
        f"RUN pip install --no-cache-dir --extra-index-url {image.TORCH_INDEX['cpu']} . && useradd -m -u 1000 dyngate",
        "USER 1000",
        'ENTRYPOINT ["dyngate"]',
    ]) + "\n"


def readme(options: DeployOptions, facts: RepositoryFacts, version: str) -> str:
    store = (f"the PersistentVolumeClaim `{options.object_name('models')}` (copy the repository into it)"
             if store_scheme(options.model_store) == PVC else f"`{options.model_store}` (Triton reads it itself)")
    return "\n".join([
        f"# {options.name} on Kubernetes",
        "",
        f"Written by `dyngate deploy kubernetes` from `{options.repository}`: {len(facts.models)} Triton models, "
        f"served by Triton {version} from {store}.",
        "",
        f"1. Images: `docker build -t {_image_name(options, 'triton')}:<tag> overlays/cpu` (or overlays/gpu) and "
        f"`docker build -f gateway.Dockerfile -t {_image_name(options, 'gateway')}:<tag> <dyngate checkout>`; push.",
        f"2. The login: `kubectl create secret generic {options.secret} --from-literal=user=... "
        "--from-literal=password=...`.",
        "3. `kubectl apply -k overlays/cpu` (or overlays/gpu). Triton's queue time as a second HPA metric: add "
        f"`components: [../../components/{COMPONENT}]` to the overlay and install the rule in "
        f"`components/{COMPONENT}/prometheus-adapter-rules.yaml` into prometheus-adapter.",
        "",
    ])


# ------------------------------------------------------------------------------------------- command line

def add_arguments(parser) -> None:
    """`dyngate deploy kubernetes ...` flags on the `deploy` subparser (one target today: kubernetes)."""
    targets = parser.add_subparsers(dest="target", required=True)
    p = targets.add_parser("kubernetes", help="a Kustomize base plus cpu and gpu overlays for the repository")
    d = DeployOptions.__dataclass_fields__
    p.add_argument("--repository", default=os.environ.get("DYNGATE_REPOSITORY", "model_repository"))
    p.add_argument("--out", required=True, help="folder to write (new, empty, or written by this command before)")
    p.add_argument("--overlay", action="append", metavar="|".join(OVERLAYS),
                   help="overlay to write (repeatable; default: all)")
    p.add_argument("--model-store", default=PVC, help=f"{PVC!r} (a PersistentVolumeClaim) or an object-store URL "
                   f"Triton reads: {', '.join(s + '://...' for s in STORE_SCHEMES)}")
    p.add_argument("--name", default=d["name"].default, help="prefix of every object name")
    p.add_argument("--namespace", default=None)
    p.add_argument("--registry", default="", help="image registry prefix, e.g. registry.example.com/team")
    p.add_argument("--triton-replicas", type=int, default=d["triton_replicas"].default)
    p.add_argument("--triton-max-replicas", type=int, default=d["triton_max_replicas"].default)
    p.add_argument("--gateway-replicas", type=int, default=d["gateway_replicas"].default)
    p.add_argument("--triton-cpu", default=d["triton_cpu"].default, help="CPU request of a Triton pod")
    p.add_argument("--triton-memory", default=None, help="memory request of a Triton pod, with a unit and above "
                                                         "the /dev/shm volume, e.g. 2Gi (default: from the "
                                                         "repository's variants)")
    p.add_argument("--gateway-cpu", default=d["gateway_cpu"].default)
    p.add_argument("--gateway-memory", default=d["gateway_memory"].default)
    p.add_argument("--cpu-target", type=int, default=d["cpu_target_percent"].default,
                   help="the HPA's CPU utilisation target, percent")
    p.add_argument("--queue-time-target-ms", type=float, default=d["queue_time_target_ms"].default,
                   help="the queue-time component's target: average queue time per request, ms")
    p.add_argument("--triton-version", default=None, help="Triton server version of the image (default: the "
                                                          "embedded server's)")
    p.add_argument("--login-secret", default=None, help="Secret with the gateway's user and password keys "
                                                        "(default: <name>-gateway-login)")


def options_from_args(args) -> DeployOptions:
    return DeployOptions(
        repository=Path(args.repository), out=Path(args.out), overlays=tuple(args.overlay or OVERLAYS),
        model_store=args.model_store, name=args.name, namespace=args.namespace, registry=args.registry,
        triton_replicas=args.triton_replicas, triton_max_replicas=args.triton_max_replicas,
        gateway_replicas=args.gateway_replicas, triton_cpu=args.triton_cpu, triton_memory=args.triton_memory,
        gateway_cpu=args.gateway_cpu, gateway_memory=args.gateway_memory, cpu_target_percent=args.cpu_target,
        queue_time_target_ms=args.queue_time_target_ms, triton_version=args.triton_version,
        login_secret=args.login_secret)


# --------------------------------------------------------------------------------------------------- writing

def write_kubernetes(options: DeployOptions, log=print) -> Path:
    """Write the Kustomize base, the chosen overlays and the component into `options.out`; returns it.

    Raises ConfigError (bad input, `out` exists and was not written by this command) and ServingError (the
    embedded Triton could not tell its version) before anything is written.
    """
    facts = read_repository(options.repository)
    check_triton_memory(options, facts)
    out = options.out
    if out.exists() and not (out / MARKER).exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and was not written by `dyngate deploy`; choose an empty or "
                          "new folder (its files are never overwritten)")
    version = options.triton_version or image.embedded_server_version()
    image.container_tag(version)  # checks the version before anything is written
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror}); give a folder in a writable "
                          "place") from None
    try:
        objects = {**triton_objects(options, facts), **gateway_objects(options, facts)}
        _write(staging / "base", objects)
        _write(staging / "base", {"kustomization.yaml": base_kustomization(options, list(objects), facts)})
        for entry in facts.models:
            target = staging / "base" / "catalog" / entry.name
            target.mkdir(parents=True)
            for file in (CONFIG_FILE, METADATA_FILE):
                if (entry.folder / file).is_file():
                    shutil.copyfile(entry.folder / file, target / file)
        for device in options.overlays:
            _write(staging / "overlays" / device, overlay(options, facts, device, version))
        _write(staging / "components" / COMPONENT, queue_time_component(options))
        _write(staging, {"gateway.Dockerfile": gateway_dockerfile(), "README.md": readme(options, facts, version),
                         MARKER: json.dumps({"repository": str(options.repository), "triton": version}) + "\n"})
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {out}: base, overlays {', '.join(options.overlays)}, component {COMPONENT}; "
        f"kubectl apply -k {out / 'overlays' / options.overlays[0]}")
    return out


def _write(folder: Path, files: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False, width=120)
        (folder / name).write_text(text)
