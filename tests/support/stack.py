"""A hotslot stack of real processes for integration tests: registry, storage-cache, executors (and a router),
with a family of tiny models written into the share and registered."""
from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as epb
from hotslot.executor.v1 import executor_service_pb2_grpc as egrpc
from hotslot.registry.v1 import registry_service_pb2 as rpb
from hotslot.registry.v1 import registry_service_pb2_grpc as rgrpc
from tests.support.procs import ServiceProcess, spawn_service, start_service, wait_ready


@dataclass
class Stack:
    root: Path
    share: Path
    registry: ServiceProcess
    storage: ServiceProcess
    executors: list[ServiceProcess] = field(default_factory=list)
    router: ServiceProcess | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of every service this stack starts (e.g. OTEL_*); per-call `env` adds to it."""
    extra: list[ServiceProcess] = field(default_factory=list)
    """Routers started after the first one."""

    def _env(self, env: dict[str, str] | None) -> dict[str, str]:
        return {**self.env, **(env or {})}

    def _executor_args(self, args: tuple[str, ...]) -> list[str]:
        return ["--registry-address", self.registry.address, "--storage-address", self.storage.address,
                "--max-width", "256", "--max-height", "256", "--default-width", "64", "--default-height", "64",
                "--default-steps", "4", *args]

    def start_executor(self, *args: str, name: str = "executor", env: dict[str, str] | None = None) -> ServiceProcess:
        svc = start_service(
            "executor",
            self._executor_args(args),
            log_path=self.root / f"{name}-{len(self.executors)}.log",
            env=self._env(env),
            timeout=180,
        )
        self.executors.append(svc)
        return svc

    def start_executors(self, count: int, *args: str, name: str = "executor",
                        env: dict[str, str] | None = None) -> list[ServiceProcess]:
        """Starts `count` executors at once (each imports torch and spawns its preloader: the slow part) and waits
        until all are SERVING."""
        spawned = [
            spawn_service("executor", self._executor_args(args),
                          log_path=self.root / f"{name}-{len(self.executors) + i}.log", env=self._env(env))
            for i in range(count)
        ]
        self.executors.extend(spawned)
        for svc in spawned:
            wait_ready(svc, 180)
        return spawned

    def start_router(self, *args: str, env: dict[str, str] | None = None,
                     executors: list[ServiceProcess] | None = None, name: str = "router") -> ServiceProcess:
        """Starts a router in front of `executors` (default: every executor of the stack). The first one started
        is `self.router`; further ones (other settings, a subset of executors) are returned and stopped with the
        stack."""
        router = start_service(
            "router",
            ["--registry-address", self.registry.address,
             "--executors", ",".join(e.address for e in (self.executors if executors is None else executors)),
             *args],
            log_path=self.root / f"{name}.log",
            env=self._env(env),
        )
        if self.router is None:
            self.router = router
        else:
            self.extra.append(router)
        return router

    def stop(self) -> None:
        for svc in [*( [self.router] if self.router else []), *self.extra, *self.executors, self.storage,
                    self.registry]:
            svc.stop()


def start_stack(root: Path, models: list[Path], *, storage_args: tuple[str, ...] = (),
                env: dict[str, str] | None = None) -> Stack:
    """Registry and storage-cache with `models` copied into the share and registered. `env` is added to the
    environment of these and of every executor and router the stack starts later."""
    env = dict(env or {})
    share = root / "share"
    for model in models:
        shutil.copytree(model, share / "models" / model.name)
    registry = start_service(
        "registry", ["--models-root", str(share), "--database", str(root / "registry.db")],
        log_path=root / "registry.log", env=env,
    )
    storage = start_service(
        "storage-cache",
        ["--backing-root", str(share), "--cache-dir", str(root / "cache"), "--registry-address", registry.address,
         *storage_args],
        log_path=root / "storage-cache.log", env=env,
    )
    with grpc.insecure_channel(registry.address) as channel:
        stub = rgrpc.RegistryServiceStub(channel)
        for model in models:
            stub.RegisterModel(rpb.RegisterModelRequest(model_id=model.name, source=f"models/{model.name}"), timeout=60)
    return Stack(root, share, registry, storage, env=env)


@contextlib.contextmanager
def running_cluster(root: Path, models: list[Path], executors: int = 2, *,
                    executor_args: tuple[str, ...] = ()) -> Iterator[Stack]:
    """`start_stack`, then `executors` executors (with `executor_args`) and a router in front of them; all stopped
    on exit."""
    stack = start_stack(root, models)
    try:
        stack.start_executors(executors, *executor_args)
        stack.start_router()
        yield stack
    finally:
        stack.stop()


def generate_request(model_id: str, *, prompt: str = "a lighthouse at dusk", seed: int = 7, **params) -> epb.GenerateRequest:
    return epb.GenerateRequest(
        model=common_pb2.ModelRef(model_id=model_id),
        params=common_pb2.GenerationParams(prompt=prompt, seed=seed, **params),
    )


def executor_stub(channel: grpc.Channel) -> egrpc.ExecutorServiceStub:
    return egrpc.ExecutorServiceStub(channel)


def ms(duration) -> float:
    return duration.ToNanoseconds() / 1e6
