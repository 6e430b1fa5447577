"""The Kubernetes deployment (deploy/) checked offline, with no cluster: the base and the overlays render with
`kubectl kustomize` (tests/deploy/render.py; `make install` puts kubectl into .venv/bin), every object is valid for
the Kubernetes API, and everything the manifests tell the services (environment variables, flags, ports, addresses,
probes, grace periods, volumes) exists in the services' settings and CLI, so the manifests cannot drift from the
code unnoticed. The image definition is checked against the Makefile's install."""
from __future__ import annotations

import functools
import math
import os
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import kubernetes_validate
import opentelemetry.environment_variables
import opentelemetry.sdk.environment_variables
import pytest
import yaml
from pydantic import ByteSize
from typer.main import get_command

from hotslot.bootstrap.metrics import METRICS_PATH
from hotslot.bootstrap.settings import METRICS_OFF, ServiceSettings, settings_from
from hotslot.cli.main import app
from hotslot.executor.v1 import executor_service_pb2
from hotslot.registry.v1 import registry_service_pb2
from hotslot.router.v1 import router_service_pb2
from hotslot.services.executor.settings import ExecutorSettings
from hotslot.services.registry.settings import RegistrySettings
from hotslot.services.router.settings import RouterSettings
from hotslot.services.storage_cache.settings import StorageCacheSettings
from hotslot.storage.v1 import storage_cache_service_pb2

from .render import render, split_image

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
RENDERS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu",
           "tls": K8S / "overlays" / "tls"}
OVERLAYS = ("cpu", "gpu", "tls")  # the deployable renders; the base lacks the executor workload on purpose
# Custom resources of cert-manager (the tls overlay): no schema ships offline, their structure is checked below.
CERT_MANAGER_API = "cert-manager.io/v1"
NAMESPACE = "hotslot"

# The oldest Kubernetes the manifests are meant for (native gRPC probes are GA since 1.27,
# internalTrafficPolicy since 1.26) and the newest whose schemas the installed kubernetes-validate ships (1.37 with
# kubernetes-validate 1.37), so an API removed in a new release fails here when the package is upgraded.
KUBERNETES_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())

# `hotslot serve <name>` -> its settings class (env prefix and fields) and its gRPC service's descriptor module.
SERVICES: dict[str, tuple[type[ServiceSettings], Any]] = {
    "registry": (RegistrySettings, registry_service_pb2),
    "storage-cache": (StorageCacheSettings, storage_cache_service_pb2),
    "executor": (ExecutorSettings, executor_service_pb2),
    "router": (RouterSettings, router_service_pb2),
}

# Values the kubelet fills in at run time (downward API), stood in for when settings are built from a manifest.
FIELD_REF_EXAMPLES = {
    "status.podIP": "10.244.0.7",
    "status.hostIP": "172.18.0.2",
    "spec.nodeName": "gpu-node-1",
    "metadata.name": "hotslot-executor-0",
    "metadata.namespace": NAMESPACE,
}

# After the shutdown grace the process still flushes buffered spans (bounded at 5 s in bootstrap/telemetry.py)
# before it exits: the pod's terminationGracePeriodSeconds must leave it that long, or SIGKILL loses the spans.
EXIT_MARGIN_S = 5

# The image's user (deploy/Dockerfile); every pod runs as it.
IMAGE_UID = 10001

WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")
OTEL_VARIABLES = {
    value
    for module in (opentelemetry.environment_variables, opentelemetry.sdk.environment_variables)
    for value in vars(module).values()
    if isinstance(value, str) and value.startswith("OTEL_")
}


# ---------------------------------------------------------------------------------------------------------------
# rendering and reading the manifests


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in RENDERS.items()}


def workloads(objects: list[dict]) -> list[dict]:
    return [obj for obj in objects if obj["kind"] in WORKLOAD_KINDS]


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def hotslot_containers(objects: list[dict]) -> list[tuple[dict, dict, str]]:
    """(workload, container, service) for every container that runs a service: its own command
    (`command: [hotslot-<service>]`, the console script of its distribution) or `hotslot serve <service>`."""
    found = []
    for workload in workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            command, args = container.get("command", []), container.get("args", [])
            if len(command) == 1 and command[0].removeprefix("hotslot-") in SERVICES:
                found.append((workload, container, command[0].removeprefix("hotslot-")))
            elif args[:1] == ["serve"]:
                found.append((workload, container, args[1]))
    return found


def service_flags(container: dict) -> list[str]:
    """The flags after the service's command (`hotslot-<service>` or `hotslot serve <service>`)."""
    args = list(container.get("args", []))
    return args if container.get("command") else args[2:]


def workload_of(objects: list[dict], service: str) -> tuple[dict, dict]:
    matches = [(w, c) for w, c, s in hotslot_containers(objects) if s == service]
    assert len(matches) == 1, f"{len(matches)} workloads run `hotslot serve {service}`"
    return matches[0]


def cpu_cores(quantity: str) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def quantity_bytes(quantity: str) -> int:
    text = str(quantity)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40),
                           ("k", 10**3), ("M", 10**6), ("G", 10**9), ("T", 10**12)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def env_values(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet would set it: downward-API values stood in by examples, and
    $(VAR) expanded from the variables listed before it (as Kubernetes does; later ones are left as written)."""
    values: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            value = re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], m[0]), str(entry["value"]))
        elif "fieldRef" in entry.get("valueFrom", {}):
            value = FIELD_REF_EXAMPLES[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "resourceFieldRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["resourceFieldRef"]
            kind, resource = ref["resource"].split(".")
            assert resource == "cpu" and str(ref.get("divisor", "1")) == "1", f"{entry['name']}: {ref}"
            value = str(math.ceil(cpu_cores(container["resources"][kind]["cpu"])))
        else:
            raise AssertionError(f"{entry['name']}: unsupported env source {entry}")
        values[entry["name"]] = value
    return values


@functools.cache
def serve_command(service: str):
    serve = get_command(app).commands["serve"]
    command = serve.commands.get(service)
    assert command is not None, f"`hotslot serve {service}` does not exist (commands: {sorted(serve.commands)})"
    return command


def settings_of(container: dict, service: str) -> ServiceSettings:
    """The settings the service would run with in this container: its environment, then its flags on top, through
    the same settings_from() the CLI uses."""
    cls, _ = SERVICES[service]
    params = serve_command(service).make_context(service, service_flags(container)).params
    flags = {name: value for name, value in params.items() if name in cls.model_fields}
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HOTSLOT_")} | env_values(container)
    with mock.patch.dict(os.environ, environment, clear=True):
        return settings_from(cls, flags)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def selects(service: dict, workload: dict) -> bool:
    labels = workload["spec"]["template"]["metadata"].get("labels", {})
    selector = service["spec"].get("selector") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def service_port(objects: list[dict], address: str) -> tuple[dict, dict]:
    """The Service a host:port address names, and its port entry."""
    host, port = split_address(address)
    service = find(objects, "Service", host)
    ports = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert ports, f"{address}: Service {host} has no port {port}"
    return service, ports[0]


def volume_mount(workload: dict, container: dict, mount_path: str | os.PathLike) -> dict:
    """The pod volume mounted at `mount_path` in the container."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == str(mount_path)]
    assert mounts, f"{container['name']}: nothing mounted at {mount_path}"
    volumes = workload["spec"]["template"]["spec"]["volumes"]
    return next(v for v in volumes if v["name"] == mounts[0]["name"])


def mount_of(container: dict, path: PurePosixPath) -> dict:
    """The volumeMount that holds `path` (the longest mountPath that is a parent of it or it)."""
    holders = [m for m in container.get("volumeMounts", [])
               if path == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in path.parents]
    assert holders, f"{container['name']}: {path} is on no volume (lost on restart)"
    return max(holders, key=lambda m: len(m["mountPath"]))


# ---------------------------------------------------------------------------------------------------------------
# valid Kubernetes


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", list(RENDERS))
def test_every_rendered_object_validates_against_the_kubernetes_schemas(rendered, name, version):
    problems = []
    for obj in rendered[name]:
        if obj["apiVersion"] == CERT_MANAGER_API:
            continue
        try:
            # strict: unknown fields (a typo such as `readinesProbe`) are errors, not silently dropped.
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(error.message)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(RENDERS))
def test_objects_are_named_and_labelled_as_one_application_in_its_namespace(rendered, name):
    for obj in rendered[name]:
        meta = obj["metadata"]
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "hotslot", f"{obj['kind']}/{meta['name']}"
        assert meta["name"].startswith("hotslot"), meta["name"]
        if obj["kind"] not in ("Namespace", "PersistentVolume"):
            assert meta.get("namespace") == NAMESPACE, f"{obj['kind']}/{meta['name']}"
            assert labels.get("app.kubernetes.io/name"), f"{obj['kind']}/{meta['name']}"
    for workload in workloads(rendered[name]):
        name_label = workload["metadata"]["labels"]["app.kubernetes.io/name"]
        assert name_label == workload["metadata"]["name"]
        assert workload["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name_label}
        assert workload["spec"]["template"]["metadata"]["labels"] == workload["metadata"]["labels"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_service_selects_pods_that_exist_on_ports_they_open(rendered, name):
    objects = rendered[name]
    for service in (obj for obj in objects if obj["kind"] == "Service"):
        selected = [w for w in workloads(objects) if selects(service, w)]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for workload in selected:
            container_ports = [
                port for c in workload["spec"]["template"]["spec"]["containers"] for port in c.get("ports", [])
            ]
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                key = "name" if isinstance(target, str) else "containerPort"
                assert any(p.get(key) == target for p in container_ports), (
                    f"Service {service['metadata']['name']} targets port {target!r}, which "
                    f"{workload['kind']}/{workload['metadata']['name']} does not open"
                )


@pytest.mark.parametrize("name", OVERLAYS)
def test_each_overlay_runs_all_four_services_once(rendered, name):
    services = sorted(service for _, _, service in hotslot_containers(rendered[name]))
    assert services == sorted(SERVICES)


# ---------------------------------------------------------------------------------------------------------------
# the manifests against the services' settings and CLI


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_hotslot_variable_is_a_setting_of_its_service(rendered, name):
    for workload, container, service in hotslot_containers(rendered[name]):
        cls, _ = SERVICES[service]
        prefix = cls.model_config["env_prefix"]
        known = {f"{prefix}{field}".upper() for field in cls.model_fields}
        used = {entry["name"] for entry in container.get("env", []) if entry["name"].startswith("HOTSLOT_")}
        assert used <= known, (
            f"{workload['metadata']['name']}: {sorted(used - known)} are not settings of {cls.__name__} "
            f"(prefix {prefix})"
        )
        assert not container.get("envFrom"), "HOTSLOT_* variables from envFrom would escape this check"


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_otel_variable_is_one_opentelemetry_reads(rendered, name):
    for workload, container, _ in hotslot_containers(rendered[name]):
        used = {entry["name"] for entry in container.get("env", []) if entry["name"].startswith("OTEL_")}
        assert used <= OTEL_VARIABLES, f"{workload['metadata']['name']}: unknown {sorted(used - OTEL_VARIABLES)}"


@pytest.mark.parametrize("name", list(RENDERS))
def test_env_references_only_variables_defined_before_them(rendered, name):
    # Kubernetes expands $(VAR) only from variables earlier in the list; a later one stays literal text.
    for workload in workloads(rendered[name]):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            defined: set[str] = set()
            for entry in container.get("env", []):
                for reference in re.findall(r"\$\((\w+)\)", str(entry.get("value", ""))):
                    assert reference in defined, f"{container['name']}: {entry['name']} uses $({reference})"
                defined.add(entry["name"])


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_flag_exists_in_its_serve_command_and_every_value_is_accepted(rendered, name):
    # make_context parses the arguments as `hotslot serve <service>` would (unknown flags and bad values raise);
    # the settings class then validates flags and environment together.
    for workload, container, service in hotslot_containers(rendered[name]):
        assert all(arg.startswith("--") for arg in service_flags(container)), container.get("args")
        settings = settings_of(container, service)
        assert settings.host == "0.0.0.0", f"{workload['metadata']['name']}: must listen on every interface"
        assert settings.log_format == "json", f"{workload['metadata']['name']}: one JSON object per log line"


@pytest.mark.parametrize("name", list(RENDERS))
def test_ports_and_probes_match_the_port_each_service_listens_on(rendered, name):
    for workload, container, service in hotslot_containers(rendered[name]):
        settings = settings_of(container, service)
        port = settings.port
        where = workload["metadata"]["name"]
        assert [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"] == [port], where
        if settings.tls_cert_file is not None:
            # Kubernetes' gRPC probes cannot speak TLS: they ask the plaintext health-only port.
            assert settings.health_port, f"{where}: TLS without a health port leaves the probes nothing to ask"
            assert [p["containerPort"] for p in container["ports"] if p["name"] == "health"] == [settings.health_port]
            port = settings.health_port
        _, module = SERVICES[service]
        health_names = {""} | {s.full_name for s in module.DESCRIPTOR.services_by_name.values()}
        for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = container.get(probe_name)
            if probe is None:
                assert probe_name == "startupProbe", f"{where}: no {probe_name}"
                continue
            assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{where}: {probe_name}"
            assert probe["grpc"]["port"] == port, f"{where}: {probe_name} on {probe['grpc']['port']}"
            assert probe["grpc"].get("service", "") in health_names, f"{where}: {probe_name} {probe['grpc']}"
        # Readiness follows the service's own status, which turns NOT_SERVING first on shutdown.
        assert container["readinessProbe"]["grpc"].get("service"), f"{where}: readiness names no service"


@pytest.mark.parametrize("name", list(RENDERS))
def test_prometheus_scrapes_each_pod_on_the_port_and_path_its_service_serves_metrics_on(rendered, name):
    for workload, container, service in hotslot_containers(rendered[name]):
        settings = settings_of(container, service)
        where = workload["metadata"]["name"]
        assert settings.metrics_port not in (METRICS_OFF, 0), f"{where}: metrics need a fixed port to be scraped"
        assert settings.metrics_port != settings.port, where
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", where
        assert annotations.get("prometheus.io/port") == str(settings.metrics_port), where
        assert annotations.get("prometheus.io/path") == METRICS_PATH, where
        assert [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"] == [settings.metrics_port]


@pytest.mark.parametrize("name", list(RENDERS))
def test_termination_grace_outlasts_the_services_shutdown_grace(rendered, name):
    for workload, container, service in hotslot_containers(rendered[name]):
        grace = settings_of(container, service).shutdown_grace_s
        period = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert period >= grace + EXIT_MARGIN_S, f"{workload['metadata']['name']}: {period} s for a {grace} s grace"


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_address_a_service_dials_is_a_service_of_the_deployment(rendered, name):
    objects = rendered[name]
    registry_workload, registry_container = workload_of(objects, "registry")
    registry_port = settings_of(registry_container, "registry").port
    storage_workload, storage_container = workload_of(objects, "storage-cache")
    storage_port = settings_of(storage_container, "storage-cache").port
    executor_workload, executor_container = workload_of(objects, "executor")
    executor = settings_of(executor_container, "executor")

    def points_at(address: str, workload: dict, port: int) -> dict:
        service, entry = service_port(objects, address)
        assert selects(service, workload), f"{address} does not select {workload['metadata']['name']}"
        target = entry.get("targetPort", entry["port"])
        assert target == port or target == "grpc", f"{address} forwards to {target}, the service listens on {port}"
        return service

    for service in ("storage-cache", "executor", "router"):
        _, container = workload_of(objects, service)
        points_at(settings_of(container, service).registry_address, registry_workload, registry_port)

    # The executor's storage-cache must be the one on its own node: its view paths are paths on that node's disk.
    storage_service = points_at(executor.storage_address, storage_workload, storage_port)
    assert storage_service["spec"].get("internalTrafficPolicy") == "Local"

    # The router finds executors by DNS: a headless Service, so the name resolves to every executor pod.
    _, router_container = workload_of(objects, "router")
    executors_service = points_at(settings_of(router_container, "router").executors_dns,
                                  executor_workload, executor.port)
    assert executors_service["spec"].get("clusterIP") == "None"
    if executor_workload["kind"] == "StatefulSet":
        assert executor_workload["spec"]["serviceName"] == executors_service["metadata"]["name"]

    # ...and dials the address each executor advertises: its pod IP, which is what that DNS name resolves to.
    assert executor.advertise_address == f"{FIELD_REF_EXAMPLES['status.podIP']}:{executor.port}"


@pytest.mark.parametrize("name", list(RENDERS))
def test_traces_go_to_the_collector_on_the_port_it_receives_on(rendered, name):
    objects = rendered[name]
    collector_config = yaml.safe_load(find(objects, "ConfigMap", "hotslot-otel-collector")["data"]["collector.yaml"])
    _, receive_port = split_address(collector_config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    collector = find(objects, "Deployment", "hotslot-otel-collector")
    for workload, container, _ in hotslot_containers(objects):
        env = env_values(container)
        assert env["OTEL_TRACES_EXPORTER"] == "otlp", workload["metadata"]["name"]
        endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert endpoint.startswith("http://"), "the collector speaks plaintext gRPC in the cluster"
        service, entry = service_port(objects, endpoint.removeprefix("http://"))
        assert selects(service, collector)
        collector_ports = collector["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert [p["containerPort"] for p in collector_ports if p["name"] == entry["targetPort"]] == [receive_port]


@pytest.mark.parametrize("name", OVERLAYS)
def test_executors_mount_the_node_cache_at_the_storage_caches_own_path(rendered, name):
    objects = rendered[name]
    storage_workload, storage_container = workload_of(objects, "storage-cache")
    cache_dir = settings_of(storage_container, "storage-cache").cache_dir
    cache_volume = volume_mount(storage_workload, storage_container, cache_dir)
    assert "hostPath" in cache_volume, "the cache must outlive the pod and be shared with the node's executors"

    executor_workload, executor_container = workload_of(objects, "executor")
    executor_volume = volume_mount(executor_workload, executor_container, cache_dir)
    assert executor_volume.get("hostPath", {}).get("path") == cache_volume["hostPath"]["path"], (
        "the executor opens the view paths the storage-cache returns: same host directory, same mount path"
    )
    # Both sets of pods must land on the same nodes.
    for key in ("nodeSelector", "tolerations"):
        assert (executor_workload["spec"]["template"]["spec"].get(key)
                == storage_workload["spec"]["template"]["spec"].get(key)), key


@pytest.mark.parametrize("name", list(RENDERS))
def test_registry_and_storage_caches_see_the_same_model_share_and_keep_state_on_volumes(rendered, name):
    objects = rendered[name]
    registry_workload, registry_container = workload_of(objects, "registry")
    registry = settings_of(registry_container, "registry")
    storage_workload, storage_container = workload_of(objects, "storage-cache")
    storage = settings_of(storage_container, "storage-cache")

    # Model sources are paths relative to the share, so both must mount the same claim at the same path.
    assert registry.models_root == storage.backing_root
    registry_models = volume_mount(registry_workload, registry_container, registry.models_root)
    storage_models = volume_mount(storage_workload, storage_container, storage.backing_root)
    claim = registry_models["persistentVolumeClaim"]["claimName"]
    assert storage_models["persistentVolumeClaim"]["claimName"] == claim
    pvc = find(objects, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pv = find(objects, "PersistentVolume", pvc["spec"]["volumeName"])
    assert "ReadWriteMany" in pv["spec"]["accessModes"]

    # The catalogue's database is on a volume of its own, and with SQLite one pod writes it at a time.
    mount = mount_of(registry_container, PurePosixPath(str(registry.database)))
    volumes = registry_workload["spec"]["template"]["spec"]["volumes"]
    data = next(v for v in volumes if v["name"] == mount["name"])
    assert "persistentVolumeClaim" in data
    assert registry_workload["kind"] == "Deployment"
    assert registry_workload["spec"]["replicas"] == 1
    assert registry_workload["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("name", OVERLAYS)
def test_executor_memory_budgets_fit_its_shared_memory_and_its_limit(rendered, name):
    workload, container = workload_of(rendered[name], "executor")
    executor = settings_of(container, "executor")
    shm = volume_mount(workload, container, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory", "a container's own /dev/shm is 64 MiB"
    shm_bytes = quantity_bytes(shm["emptyDir"]["sizeLimit"])
    limits = container["resources"]["limits"]
    on_gpu = executor.device.startswith("cuda")
    # On CPU every tier lives in shared memory; on CUDA the active and standby slots are device memory.
    in_shm = int(executor.host_budget_bytes)
    if not on_gpu:
        in_shm += int(executor.active_budget_bytes) + int(executor.standby_budget_bytes)
    assert in_shm <= shm_bytes <= quantity_bytes(limits["memory"]), (
        f"{ByteSize(in_shm).human_readable()} of budgets, {shm['emptyDir']['sizeLimit']} of /dev/shm, "
        f"{limits['memory']} memory limit"
    )
    assert executor.torch_threads == math.ceil(cpu_cores(limits["cpu"]))
    gpus = {k: v for k, v in limits.items() if k.startswith("nvidia.com/")}
    if name in ("gpu", "tls"):  # the tls overlay is the gpu one with TLS
        assert on_gpu and gpus == {"nvidia.com/gpu": 1}, "one executor per GPU, seen as `cuda`"
        assert executor.dtype == "float16"
    else:
        assert executor.device == "cpu" and not gpus


# ---------------------------------------------------------------------------------------------------------------
# pods: security, resources, images


@pytest.mark.parametrize("name", list(RENDERS))
def test_pods_run_as_the_images_non_root_user(rendered, name):
    hotslot_workloads = {id(workload) for workload, _, _ in hotslot_containers(rendered[name])}
    for workload in workloads(rendered[name]):
        spec = workload["spec"]["template"]["spec"]
        where = workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        if id(workload) in hotslot_workloads:
            assert spec["securityContext"]["runAsUser"] == IMAGE_UID, where
        for container in spec["containers"]:
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, f"{where}/{container['name']}"
            assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{container['name']}"
            assert "runAsUser" not in context and "runAsNonRoot" not in context, f"{where}/{container['name']}"
        for container in spec.get("initContainers", []):
            # The one exception: handing a kubelet-created (root-owned) hostPath directory to the image's user.
            context = container["securityContext"]
            assert context["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}, f"{where}/{container['name']}"
            assert container["command"][:2] == ["chown", f"{IMAGE_UID}:{IMAGE_UID}"], f"{where}/{container['name']}"


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_container_has_requests_and_limits(rendered, name):
    for workload in workloads(rendered[name]):
        spec = workload["spec"]["template"]["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            resources = container["resources"]
            where = f"{workload['metadata']['name']}/{container['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{where}: {kind}"
            assert cpu_cores(resources["requests"]["cpu"]) <= cpu_cores(resources["limits"]["cpu"]), where
            assert quantity_bytes(resources["requests"]["memory"]) <= quantity_bytes(resources["limits"]["memory"])


# Which image (deploy/Dockerfile target, kustomize image name) runs which service: torch only in the executor's.
SLIM_SERVICES = ("registry", "storage-cache", "router")
IMAGE_OF = {**dict.fromkeys(SLIM_SERVICES, "hotslot-slim"), "executor": "hotslot-executor"}


def image_name(image: str) -> str:
    """The image's last path component without tag or digest (registry.example.com/hotslot-slim:0.1.0 ->
    hotslot-slim)."""
    repository, _, _ = split_image(image)
    return repository.rsplit("/", 1)[-1]


@pytest.mark.parametrize("name", OVERLAYS)
def test_images_have_fixed_tags_and_the_hotslot_ones_are_this_version(rendered, name):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    hotslot_workloads = {id(workload) for workload, _, _ in hotslot_containers(rendered[name])}
    hotslot_images = set()
    for workload in workloads(rendered[name]):
        spec = workload["spec"]["template"]["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            _, tag, digest = split_image(container["image"])
            assert digest or (tag and tag != "latest"), f"{container['image']}: a floating tag"
            # Kind-loaded images exist only on the node; `Always` would try (and fail) to pull them.
            assert container["imagePullPolicy"] == "IfNotPresent", container["name"]
            if id(workload) in hotslot_workloads:
                hotslot_images.add(container["image"])
    assert {image_name(image) for image in hotslot_images} == set(IMAGE_OF.values()), hotslot_images
    for image in hotslot_images:
        _, tag, _ = split_image(image)
        # The slim image is the same on CPU and GPU nodes; the executor's tag names its torch build (-cpu, -cu124).
        assert tag == version or tag.startswith(f"{version}-"), f"{image}: tag {tag} is not of version {version}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_router_registry_and_storage_cache_run_the_slim_image_and_executors_the_executor_image(rendered, name):
    for workload, container, service in hotslot_containers(rendered[name]):
        where = f"{workload['metadata']['name']}/{container['name']}"
        assert image_name(container["image"]) == IMAGE_OF[service], f"{where}: {container['image']}"
        # Its own distribution's console script: the slim image has no `hotslot` command (it would need torch).
        assert container.get("command") == [f"hotslot-{service}"], f"{where}: {container.get('command')}"
        scripts = tomllib.loads((ROOT / "services" / service / "pyproject.toml").read_text())["project"]["scripts"]
        assert f"hotslot-{service}" in scripts, f"services/{service}/pyproject.toml has no hotslot-{service} script"
        for init in workload["spec"]["template"]["spec"].get("initContainers", []):
            assert image_name(init["image"]) == IMAGE_OF[service], f"{where}: init container {init['image']}"
    dependencies = {
        service: tomllib.loads((ROOT / "services" / service / "pyproject.toml").read_text())["project"]["dependencies"]
        for service in IMAGE_OF
    }
    for service in SLIM_SERVICES:  # what the slim image installs must not bring torch (tests/packaging proves it)
        assert not [d for d in dependencies[service] if re.match(r"(torch|hotslot-loading|hotslot-executor)\b", d)]


# ---------------------------------------------------------------------------------------------------------------
# the image against the Makefile

# Extras the Makefile installs that the image leaves out: build, lint and test tools (the protoc generator, pytest,
# ruff, grpcurl, kubernetes-validate). Rule: the image installs exactly the Makefile's extras minus these, so a new
# runtime extra added to the Makefile's install must reach the image too.
DEV_ONLY_EXTRAS = {"dev"}


def dockerfile_lines() -> list[str]:
    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def makefile_text() -> str:
    return (ROOT / "Makefile").read_text()


def test_the_image_installs_the_makefiles_torch_spec_first():
    make_default = re.search(r"^TORCH_SPEC \?= *(.+?) *$", makefile_text(), re.MULTILINE)
    assert make_default, "the Makefile's TORCH_SPEC default"
    args = [line for line in dockerfile_lines() if line.startswith("ARG TORCH_SPEC")]
    assert len(args) == 1, args
    docker_default = args[0].split("=", 1)[1].strip().strip('"')
    assert docker_default == make_default[1]

    # Both install torch from the variable (unquoted: a spec may carry --index-url), then the project.
    make_install = re.findall(r"pip install[^\n]*", makefile_text())
    docker_install = [found.strip() for line in dockerfile_lines() for found in re.findall(r"pip install[^&;]*", line)]
    for installs, torch in ((make_install, "$(TORCH_SPEC)"), (docker_install, "${TORCH_SPEC}")):
        torch_at = [i for i, line in enumerate(installs) if line.split()[-1] == torch]
        project_at = [i for i, line in enumerate(installs) if re.search(r"\s'?\.(\[|'|\s|$)", line + " ")]
        assert torch_at and project_at and torch_at[0] < project_at[0], installs


def test_the_image_installs_the_makefiles_extras_without_the_dev_tools():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert DEV_ONLY_EXTRAS <= declared

    def extras(install: str) -> set[str]:
        match = re.search(r"\.\[([^\]]*)\]", install)
        return {e.strip() for e in match[1].split(",")} if match else set()

    make_project = re.search(r"pip install[^\n]* -e '?(\.[^\s']*)", makefile_text())
    docker_project = [line for line in dockerfile_lines() if re.search(r"pip install [^&;]*\s\.(\[|\s|$)", line)]
    assert make_project and len(docker_project) == 1
    assert extras(docker_project[0]) == extras(make_project[1]) - DEV_ONLY_EXTRAS
    assert " -e " not in docker_project[0], "the image installs the project, not a link to a source tree"


def dockerfile_stages() -> dict[str, list[str]]:
    """Each `FROM ... AS name` stage's lines."""
    stages: dict[str, list[str]] = {}
    for line in dockerfile_lines():
        if line.startswith("FROM "):
            current = stages.setdefault(line.split(" AS ")[-1].strip() if " AS " in line else "", [])
        elif stages:
            current.append(line)
    return stages


def makefile_list(variable: str) -> list[str]:
    """A `NAME := a b $(OTHER)` list of the Makefile, with $(OTHER) expanded."""
    value = re.search(rf"^{variable} := *(.+?) *$", makefile_text(), re.MULTILINE)
    assert value, f"the Makefile's {variable}"
    return [w for word in value[1].split() for w in (makefile_list(word[2:-1]) if word.startswith("$(") else [word])]


def test_each_image_installs_the_makefiles_distributions_of_its_kind():
    stages = dockerfile_stages()
    assert {"slim", "executor"} <= set(stages), sorted(stages)
    assert list(stages)[-1] == "executor", "a build without --target gives the executor image (everything)"

    def installed(stage: str) -> list[str]:
        [line] = [line for line in stages[stage] if re.search(r"pip install (?!--upgrade|\$)", line)]
        return re.search(r"pip install ([^&;]*)", line)[1].split()

    assert installed("build-slim") == makefile_list("SLIM_DISTS")
    assert installed("build-executor") == [*makefile_list("DISTS"), "."]
    assert not [line for line in stages["build-slim"] if "TORCH_SPEC" in line], "the slim image gets no torch"
    assert [line for line in stages["slim"] if line.startswith("COPY --from=")] == [
        "COPY --from=build-slim /opt/hotslot /opt/hotslot"]
    for distribution in makefile_list("DISTS"):  # each folder the Makefile installs is a distribution
        assert (ROOT / distribution / "pyproject.toml").is_file(), distribution


def test_the_image_runs_hotslot_as_a_fixed_non_root_user_from_python_of_the_makefile():
    lines = dockerfile_lines()
    stages = dockerfile_stages()
    for image in ("slim", "executor"):
        assert [line for line in stages[image] if line.startswith("USER")] == [f"USER {IMAGE_UID}:{IMAGE_UID}"]
    # No ENTRYPOINT: each workload names its service's command (checked above against the distributions' scripts).
    assert not [line for line in lines if line.startswith("ENTRYPOINT")]
    assert "hotslot" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    python = re.search(r"^PYTHON \?= *python(\d+\.\d+)", makefile_text(), re.MULTILINE)[1]
    assert f"ARG PYTHON_IMAGE=python:{python}-slim" in lines


def test_the_build_context_keeps_what_the_image_copies():
    # .dockerignore at the root (the build context) is an allowlist: `*` then `!path` for what the image needs.
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for line in dockerfile_lines():
        if line.startswith("COPY") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
                kept = {source.rstrip("/"), *(str(parent) for parent in PurePosixPath(source).parents)}
                assert kept & allowed, f"{source} is excluded from the build context"


# ---------------------------------------------------------------------------------------------------------------
# security: network policies, TLS from cert-manager, tokens from a Secret


def policies(objects: list[dict]) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == "NetworkPolicy"]


def policy_for(objects: list[dict], workload: dict) -> list[dict]:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return [p for p in policies(objects)
            if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()]


def peers_selected(objects: list[dict], rule: dict, key: str) -> list[dict] | None:
    """Workloads a rule's `from`/`to` selects within the namespace; None when it admits anything (no peers, or a
    namespaceSelector)."""
    peers = rule.get(key)
    if not peers:
        return None
    selected = []
    for peer in peers:
        if "namespaceSelector" in peer or "ipBlock" in peer:
            return None
        match = peer["podSelector"].get("matchLabels", {})
        selected += [w for w in workloads(objects)
                     if match.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
    return selected


@pytest.mark.parametrize("name", OVERLAYS)
def test_only_the_router_is_reachable_from_outside_and_each_service_only_from_its_callers(rendered, name):
    objects = rendered[name]
    default = [p for p in policies(objects) if p["spec"]["podSelector"] == {}
               and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not p["spec"].get("ingress")
               and not p["spec"].get("egress")]
    assert default, "no default-deny policy: pods without a policy of their own would take any connection"
    callers = {"router": None, "registry": {"router", "storage-cache", "executor"}, "storage-cache": {"executor"},
               "executor": {"router"}}
    for service, expected in callers.items():
        workload, container = workload_of(objects, service)
        own = [p for p in policy_for(objects, workload) if p["spec"]["podSelector"]]
        assert own, f"no NetworkPolicy selects {workload['metadata']['name']}"
        rules = [rule for p in own for rule in p["spec"].get("ingress", [])]
        scrape = [rule for rule in rules if [p["port"] for p in rule["ports"]] == ["metrics"]]
        assert scrape, f"{service}: Prometheus cannot reach its metrics port"
        assert all(peers_selected(objects, rule, "from") is None for rule in scrape)  # a monitoring namespace
        port = settings_of(container, service).port
        for rule in rules:
            if rule in scrape:
                continue
            assert [p["port"] for p in rule["ports"]] == [port], f"{service}: ingress to {rule['ports']}"
            selected = peers_selected(objects, rule, "from")
            if expected is None:
                assert selected is None, f"{service} must be reachable from outside the namespace"
                continue
            assert selected is not None, f"{service} must not be reachable from outside the namespace"
            names = {s for w in selected for _, c, s in hotslot_containers([w])}
            assert names == expected, f"{service} reachable from {sorted(names)}, expected {sorted(expected)}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_each_service_may_reach_the_services_it_dials_and_the_collector(rendered, name):
    objects = rendered[name]
    dials = {"router": {"registry", "executor"}, "registry": set(), "storage-cache": {"registry"},
             "executor": {"registry", "storage-cache"}}
    for service, expected in dials.items():
        workload, _ = workload_of(objects, service)
        reached = set()
        collector = False
        for policy in policy_for(objects, workload):
            for rule in policy["spec"].get("egress", []):
                selected = peers_selected(objects, rule, "to") or []
                reached |= {s for w in selected for _, c, s in hotslot_containers([w])}
                collector |= any(w["metadata"]["name"] == "hotslot-otel-collector" for w in selected)
        assert reached == expected, f"{service} may reach {sorted(reached)}, expected {sorted(expected)}"
        assert collector, f"{service} cannot send spans to the collector"


def test_the_tls_overlay_runs_every_service_with_mtls_tokens_and_certificates_from_cert_manager(rendered):
    objects = rendered["tls"]
    issued = {c["spec"]["secretName"]: c for c in objects if c["kind"] == "Certificate"}
    issuers = {i["metadata"]["name"]: i for i in objects if i["kind"] == "Issuer"}
    for certificate in issued.values():
        ref = certificate["spec"]["issuerRef"]
        assert ref["kind"] == "Issuer" and ref["name"] in issuers, certificate["metadata"]["name"]
        if "ca" in issuers[ref["name"]]["spec"]:
            ca_secret = issuers[ref["name"]]["spec"]["ca"]["secretName"]
            assert issued[ca_secret]["spec"]["isCA"] is True
    for workload, container, service in hotslot_containers(objects):
        where = workload["metadata"]["name"]
        s = settings_of(container, service)
        assert s.tls_cert_file and s.tls_key_file and s.tls_client_ca_file, f"{where}: not mTLS"
        assert s.client_tls_ca_file and s.client_tls_cert_file and s.client_token_file, f"{where}: calls not mTLS"
        assert s.tokens_file, f"{where}: no tokens"
        for path in (s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file, s.tokens_file, s.client_token_file):
            mount = mount_of(container, PurePosixPath(path))
            assert mount.get("readOnly"), f"{where}: {path} on a writable volume"
            volume = volume_mount(workload, container, mount["mountPath"])
            secret = volume["secret"]["secretName"]
            assert secret in issued or secret == "hotslot-tokens", f"{where}: {path} from unknown Secret {secret}"
        certificate = issued[volume_mount(workload, container, mount_of(
            container, PurePosixPath(s.tls_cert_file))["mountPath"])["secret"]["secretName"]]
        assert {"server auth", "client auth"} <= set(certificate["spec"]["usages"]), where
        # Peers are checked against one name that the shared certificate carries (executors are dialled by IP).
        assert s.client_tls_server_name in certificate["spec"]["dnsNames"], where
        for address in (getattr(s, "registry_address", ""), getattr(s, "storage_address", ""),
                        getattr(s, "executors_dns", "")):
            if address:
                assert split_address(address)[0] in certificate["spec"]["dnsNames"], f"{where}: {address}"
