"""A hotslot stack of real processes for integration tests: registry, storage-cache, executors (and a router),
with a family of tiny models written into the share and registered."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as epb
from hotslot.executor.v1 import executor_service_pb2_grpc as egrpc
from hotslot.registry.v1 import registry_service_pb2 as rpb
from hotslot.registry.v1 import registry_service_pb2_grpc as rgrpc
from tests.support.procs import ServiceProcess, start_service


@dataclass
class Stack:
    root: Path
    share: Path
    registry: ServiceProcess
    storage: ServiceProcess
    executors: list[ServiceProcess] = field(default_factory=list)
    router: ServiceProcess | None = None

    def start_executor(self, *args: str, name: str = "executor") -> ServiceProcess:
        svc = start_service(
            "executor",
            ["--registry-address", self.registry.address, "--storage-address", self.storage.address,
             "--max-width", "256", "--max-height", "256", "--default-width", "64", "--default-height", "64",
             "--default-steps", "4", *args],
            log_path=self.root / f"{name}-{len(self.executors)}.log",
            timeout=180,
        )
        self.executors.append(svc)
        return svc

    def start_router(self, *args: str) -> ServiceProcess:
        self.router = start_service(
            "router",
            ["--registry-address", self.registry.address,
             "--executors", ",".join(e.address for e in self.executors), *args],
            log_path=self.root / "router.log",
        )
        return self.router

    def stop(self) -> None:
        for svc in [*( [self.router] if self.router else []), *self.executors, self.storage, self.registry]:
            svc.stop()


def start_stack(root: Path, models: list[Path], *, storage_args: tuple[str, ...] = ()) -> Stack:
    share = root / "share"
    for model in models:
        shutil.copytree(model, share / "models" / model.name)
    registry = start_service(
        "registry", ["--models-root", str(share), "--database", str(root / "registry.db")],
        log_path=root / "registry.log",
    )
    storage = start_service(
        "storage-cache",
        ["--backing-root", str(share), "--cache-dir", str(root / "cache"), "--registry-address", registry.address,
         *storage_args],
        log_path=root / "storage-cache.log",
    )
    with grpc.insecure_channel(registry.address) as channel:
        stub = rgrpc.RegistryServiceStub(channel)
        for model in models:
            stub.RegisterModel(rpb.RegisterModelRequest(model_id=model.name, source=f"models/{model.name}"), timeout=60)
    return Stack(root, share, registry, storage)


def generate_request(model_id: str, *, prompt: str = "a lighthouse at dusk", seed: int = 7, **params) -> epb.GenerateRequest:
    return epb.GenerateRequest(
        model=common_pb2.ModelRef(model_id=model_id),
        params=common_pb2.GenerationParams(prompt=prompt, seed=seed, **params),
    )


def executor_stub(channel: grpc.Channel) -> egrpc.ExecutorServiceStub:
    return egrpc.ExecutorServiceStub(channel)


def ms(duration) -> float:
    return duration.ToNanoseconds() / 1e6
