"""`hotslot up` as users run it: a subprocess that starts registry, storage-cache, an executor and the router,
serves a model registered with the CLI, and on SIGTERM stops them all (exit 0) leaving no process behind — nor
the executor's preloader or multiprocessing's resource tracker. Killed with SIGKILL it cannot clean up; its
services then die with it (PR_SET_PDEATHSIG) and take their own children along. An executor killed with SIGKILL
mid-request is restarted on its port while the router serves the request on the other executor, and rejoins."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as executor_pb
from hotslot.executor.v1 import executor_service_pb2_grpc as executor_grpc
from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc
from tests.support.procs import HOTSLOT
from tests.support.proctree import Proc, descendants, running, wait_gone
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

SERVICES = {"registry", "storage-cache", "executor-0", "router"}


class Up:
    def __init__(self, state: Path, executors: int = 1, args: tuple[str, ...] = ()) -> None:
        self.state = state
        self.stdout = state.parent / f"{state.name}-up.out"
        self.stderr = state.parent / f"{state.name}-up.err"
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [*HOTSLOT, "up", "--auto-ports", "--state-dir", str(state), "--executors", str(executors), *args],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env={**os.environ, "COLUMNS": "200"},  # rich wraps at 80 columns off a terminal
            )

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def wait_up(self, timeout: float = 180) -> dict[str, str]:
        cluster_json = self.state / "cluster.json"
        deadline = time.monotonic() + timeout
        while not (cluster_json.exists() and "hotslot is up" in self.stdout.read_text(errors="replace")):
            if self.proc.poll() is not None:
                raise AssertionError(f"hotslot up exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"hotslot up not up after {timeout}s:\n{self.output()[-4000:]}")
            time.sleep(0.1)
        return json.loads(cluster_json.read_text())

    def tree(self) -> list[Proc]:
        return descendants(self.proc.pid)

    def kill_all(self) -> None:
        """Cleanup after a failed test: the launcher and everything it started."""
        for p in self.tree():
            if running(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def describe(procs: list[Proc]) -> str:
    return "\n".join(map(str, procs))


def check_tree(tree: list[Proc], endpoints: dict[str, str]) -> None:
    """Every service is a process under `up`, and so is the executor's preloader (a spawned multiprocessing
    child); the tree is what the test then expects to vanish."""
    serving = [p for p in tree if " serve " in f" {p.cmdline} "]
    assert len(serving) == len(endpoints) == len(SERVICES), describe(tree)
    assert any("multiprocessing.spawn" in p.cmdline for p in tree), describe(tree)  # the preloader
    assert any("multiprocessing.resource_tracker" in p.cmdline for p in tree), describe(tree)


@pytest.fixture
def up(tmp_path: Path):
    launched: list[Up] = []

    def start(name: str, executors: int = 1, args: tuple[str, ...] = ()) -> Up:
        u = Up(tmp_path / name, executors, args)
        launched.append(u)
        return u

    yield start
    for u in launched:
        u.kill_all()


def test_up_serves_a_model_and_sigterm_leaves_nothing(up, tiny_family: list[Path]) -> None:
    cluster = up("state")
    endpoints = cluster.wait_up()
    assert set(endpoints) == SERVICES
    tree = cluster.tree()
    check_tree(tree, endpoints)

    model = tiny_family[0]
    shutil.copytree(model, cluster.state / "share" / "models" / model.name)
    done = subprocess.run(
        [*HOTSLOT, "models", "register", model.name, f"models/{model.name}", "--registry", endpoints["registry"]],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with grpc.insecure_channel(endpoints["router"]) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        reply = stub.Generate(pb.GenerateRequest(
            model=common_pb2.ModelRef(model_id=model.name),
            params=common_pb2.GenerationParams(prompt="a lighthouse", steps=2, width=64, height=64, seed=1)),
            timeout=300)
    assert reply.executor_id == "executor-0" and list(reply.attempted_executor_ids) == ["executor-0"]
    assert Image.open(io.BytesIO(reply.images[0].data)).size == (64, 64)

    tree = cluster.tree()  # again: generating may have started helpers (resource tracker, preloader restart)
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(60) == 0, cluster.output()[-4000:]
    left = wait_gone(tree, 5)
    assert not left, "still running after `hotslot up` exited:\n" + describe(left)
    assert not (cluster.state / "cluster.json").exists()
    out = cluster.output()
    for name in SERVICES:
        assert f"{name} stopped (exit 0)" in out, out[-4000:]


def test_up_killed_with_sigkill_leaves_nothing(up) -> None:
    cluster = up("state-kill")
    endpoints = cluster.wait_up()
    tree = cluster.tree()
    check_tree(tree, endpoints)
    cluster.proc.send_signal(signal.SIGKILL)
    assert cluster.proc.wait(10) == -signal.SIGKILL
    # Each service gets SIGTERM from the kernel as its parent dies, shuts down within its grace (5 s) and stops
    # its preloader; the preloader also ends on its own when its parent's pipe closes.
    left = wait_gone(tree, 15)
    assert not left, "still running 15 s after `hotslot up` was killed:\n" + describe(left)


def client_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HOTSLOT_CLIENT_")}
    return subprocess.run([*HOTSLOT, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**clean, "COLUMNS": "200", **env})


def test_up_with_tls_serves_only_clients_with_a_certificate_and_a_token(up, tiny_family: list[Path],
                                                                         tmp_path: Path) -> None:
    cluster = up("state-tls", args=("--tls",))
    endpoints = cluster.wait_up()
    env = client_env(cluster.state / "tls" / "client.env")
    assert env["HOTSLOT_CLIENT_ROUTER"] == endpoints["router"]
    # What `up` printed is what a user pastes: the same lines as client.env (printed after the table wait_up saw).
    deadline = time.monotonic() + 30
    while "Ctrl-C stops everything" not in cluster.stdout.read_text():
        assert time.monotonic() < deadline, cluster.output()[-4000:]
        time.sleep(0.1)
    assert f"export HOTSLOT_CLIENT_TOKEN={env['HOTSLOT_CLIENT_TOKEN']}" in cluster.stdout.read_text()
    generate_token = (cluster.state / "tls" / "generate-token").read_text().strip()

    model = tiny_family[0]
    done = cli("models", "upload", model.name, str(model), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = cli("generate", "-m", model.name, "a lighthouse", "--steps", "2", "--width", "64", "--height", "64",
               "-o", str(tmp_path / "out.png"), "--quiet", "--json",
               env={**env, "HOTSLOT_CLIENT_TOKEN": generate_token}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["executor"] == "executor-0"
    assert Image.open(tmp_path / "out.png").size == (64, 64)

    # The same through flags instead of HOTSLOT_CLIENT_*.
    done = cli("models", "list", "--router", env["HOTSLOT_CLIENT_ROUTER"], "--ca", env["HOTSLOT_CLIENT_CA"],
               "--cert", env["HOTSLOT_CLIENT_CERT"], "--key", env["HOTSLOT_CLIENT_KEY"], "--token", generate_token,
               env={}, cwd=tmp_path)
    assert done.returncode == 0 and model.name in done.stdout, done.stderr

    # No token: refused before anything runs.
    no_token = {k: v for k, v in env.items() if k != "HOTSLOT_CLIENT_TOKEN"}
    done = cli("status", env=no_token, cwd=tmp_path)
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr, done.stderr
    # A generate token may not register or upload.
    done = cli("models", "register", "again", f"models/{model.name}",
               env={**env, "HOTSLOT_CLIENT_TOKEN": generate_token}, cwd=tmp_path)
    assert done.returncode == 1 and "PERMISSION_DENIED" in done.stderr, done.stderr
    # Uploading over a registered model's files: refused, and refused again with --overwrite.
    done = cli("models", "upload", model.name, str(model), env=env, cwd=tmp_path)
    assert done.returncode == 1 and "ALREADY_EXISTS" in done.stderr, done.stderr
    done = cli("models", "upload", model.name, str(model), "--overwrite", env=env, cwd=tmp_path)
    assert done.returncode == 1 and "FAILED_PRECONDITION" in done.stderr, done.stderr

    ca = Path(env["HOTSLOT_CLIENT_CA"]).read_bytes()
    cert, key = Path(env["HOTSLOT_CLIENT_CERT"]).read_bytes(), Path(env["HOTSLOT_CLIENT_KEY"]).read_bytes()
    # Health needs the certificate (it is TLS) but no token, for probes.
    with grpc.secure_channel(endpoints["router"], grpc.ssl_channel_credentials(ca, key, cert)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # Plaintext, or TLS without a client certificate: no connection at all.
    for channel in (grpc.insecure_channel(endpoints["registry"]),
                    grpc.secure_channel(endpoints["registry"], grpc.ssl_channel_credentials(ca))):
        with channel, pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(60) == 0, cluster.output()[-4000:]
def executor_queue_depth(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = executor_grpc.ExecutorServiceStub(channel)
        return stub.GetStatus(executor_pb.GetStatusRequest(), timeout=5).status.queue_depth


def serving_executors(stub: pb_grpc.RouterServiceStub) -> list[str]:
    return sorted(e.executor_id for e in stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5).executors)


def test_up_restarts_an_executor_killed_mid_request_while_the_other_serves_it(up, tiny_family: list[Path]) -> None:
    model = tiny_family[0]
    size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    # Loads read at a capped rate by the preloader take ~8 s, so the request is still loading when it is killed.
    slow_load = (f"--executor-arg=--preload-read-bytes-per-s={max(1, size // 8)}",
                 "--executor-arg=--no-map-view-files", "--executor-arg=--no-convert-in-executor")
    cluster = up("state-heal", executors=2, args=slow_load)
    endpoints = cluster.wait_up()
    shutil.copytree(model, cluster.state / "share" / "models" / model.name)
    done = subprocess.run(
        [*HOTSLOT, "models", "register", model.name, f"models/{model.name}", "--registry", endpoints["registry"]],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    executors = ["executor-0", "executor-1"]
    with grpc.insecure_channel(endpoints["router"]) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        wait_for(lambda: serving_executors(stub) == executors, "the router follows both executors")
        pending = stub.Generate.future(pb.GenerateRequest(
            model=common_pb2.ModelRef(model_id=model.name),
            params=common_pb2.GenerationParams(prompt="a lighthouse", steps=2, width=64, height=64, seed=1)),
            timeout=300)
        victim = wait_for(lambda: next((n for n in executors if executor_queue_depth(endpoints[n]) == 1), None),
                          "the request is loading on one executor")
        (pid,) = [p.pid for p in cluster.tree() if f"--executor-id {victim} " in f"{p.cmdline} "]
        os.kill(pid, signal.SIGKILL)

        reply = pending.result()
        (survivor,) = [n for n in executors if n != victim]
        assert list(reply.attempted_executor_ids) == [victim, survivor], reply.attempted_executor_ids
        assert reply.executor_id == survivor
        assert Image.open(io.BytesIO(reply.images[0].data)).size == (64, 64)

        wait_for(lambda: f"{victim} is back" in cluster.output(), "up restarts the killed executor", timeout=180)
        wait_for(lambda: serving_executors(stub) == executors, "the restarted executor rejoins the router",
                 timeout=60)
        assert cluster.proc.poll() is None  # up kept running throughout
        # It serves again, on the address the router and cluster.json know.
        assert executor_queue_depth(endpoints[victim]) == 0
    out = cluster.output()
    assert f"{victim} (pid {pid}) exited (killed by SIGKILL); restarting it on {endpoints[victim]}" in out, out[-4000:]
    assert str(cluster.state / "logs" / f"{victim}.log") in out
    assert "hotslot up: " in (cluster.state / "logs" / f"{victim}.log").read_text()

    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(60) == 0, cluster.output()[-4000:]


def test_up_stops_everything_and_fails_when_a_service_keeps_crashing(up) -> None:
    cluster = up("state-loop", args=("--max-restarts", "1", "--restart-backoff-s", "0.2"))
    cluster.wait_up()
    tree = cluster.tree()

    def registry_pid() -> int | None:
        found = [p.pid for p in cluster.tree() if " serve registry " in f" {p.cmdline} "]
        return found[0] if found else None

    first = registry_pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: "registry is back" in cluster.output(), "up restarts the registry once", timeout=60)
    second = registry_pid()
    assert second not in (None, first)
    os.kill(second, signal.SIGKILL)

    assert cluster.proc.wait(60) == 1, cluster.output()[-4000:]
    out = cluster.output()
    assert "registry exited (killed by SIGKILL) after 1 restart within 60 s; it keeps crashing" in out, out[-4000:]
    for name in SERVICES - {"registry"}:
        assert f"{name} stopped (exit 0)" in out, out[-4000:]
    left = wait_gone(tree, 15)
    assert not left, "still running after `hotslot up` gave up:\n" + describe(left)
