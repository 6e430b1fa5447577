"""The router, the registry and the storage-cache install and run without torch: their distributions
(hotslot-proto, hotslot-core, hotslot-registry, hotslot-storage-cache, hotslot-router) go into a fresh venv with
their real dependencies (regular, not editable installs from the local folders, as the slim image does), torch is
then not importable there, and each service starts from its own console script and answers SERVING."""
from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

from hotslot.bootstrap.parent import PARENT_PID_ENV
from hotslot.cluster.process import ServiceProcess, wait_ready

ROOT = Path(__file__).resolve().parents[2]
# Read from the Makefile: the same list the slim image installs (tests/deploy checks the Dockerfile against it).
SLIM_DISTS = next(
    line.split(":=", 1)[1].split() for line in (ROOT / "Makefile").read_text().splitlines()
    if line.startswith("SLIM_DISTS :=")
)
TORCH_STACK = ("torch", "diffusers", "transformers", "safetensors", "peft", "accelerate")

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slim-venv")
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    # One pip call: each hotslot-* requirement is met by its local folder, everything else from the index.
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         *(str(ROOT / dist) for dist in SLIM_DISTS)],
        capture_output=True, text=True, env=_clean_env(),
    )
    assert installed.returncode == 0, f"pip install {' '.join(SLIM_DISTS)} failed:\n{installed.stderr[-4000:]}"
    return root


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that would let the venv see the development checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run_python(venv_root: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv_root / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          cwd=cwd, env=_clean_env())


def test_the_slim_services_install_without_torch_or_the_model_stack(slim_venv: Path, tmp_path: Path) -> None:
    listed = subprocess.run([str(slim_venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True, env=_clean_env()).stdout
    names = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert not names & set(TORCH_STACK), f"the slim services pulled in {sorted(names & set(TORCH_STACK))}"
    assert {"hotslot-proto", "hotslot-core", "hotslot-registry", "hotslot-storage-cache", "hotslot-router"} <= names
    assert not names & {"hotslot", "hotslot-loading", "hotslot-executor"}

    no_torch = _run_python(slim_venv, "import torch", cwd=tmp_path)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    # The installed copies are imported (not this checkout), and the torch-side packages are absent.
    where = _run_python(
        slim_venv,
        "import importlib.util, hotslot.services.router.wiring as w, hotslot.services.registry.wiring, "
        "hotslot.services.storage_cache.wiring, hotslot.router.v1, grpc_service_pb2; print(w.__file__); "
        "print([m for m in ('hotslot.loading', 'hotslot.services.executor', 'hotslot.cli') "
        "if importlib.util.find_spec(m) is not None])",
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    module_file, missing = where.stdout.splitlines()
    assert Path(module_file).is_relative_to(slim_venv) and missing == "[]"


def test_registry_storage_cache_and_router_run_from_their_own_commands_without_torch(
    slim_venv: Path, tmp_path: Path
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    started: list[ServiceProcess] = []

    def start(name: str, args: list[str]) -> ServiceProcess:
        log_path = tmp_path / f"{name}.log"
        env = {**_clean_env(), "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [str(slim_venv / "bin" / f"hotslot-{name}"), "--host", "127.0.0.1", "--port", "0",
                 "--metrics-port", "0", *args],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path,
                start_new_session=True,
            )
        svc = ServiceProcess(name, proc, log_path, env=env)
        started.append(svc)
        return wait_ready(svc, timeout=120)

    try:
        registry = start("registry", ["--models-root", str(share), "--database", str(tmp_path / "registry.db")])
        start("storage-cache", ["--backing-root", str(share), "--cache-dir", str(tmp_path / "cache"),
                                "--registry-address", registry.address])
        start("router", ["--registry-address", registry.address])
        for svc in started:  # each answered SERVING (wait_ready) and is still up
            assert svc.alive(), svc.log()
    finally:
        codes = {svc.name: svc.stop(timeout=30) for svc in reversed(started)}
    assert codes == {"router": 0, "storage-cache": 0, "registry": 0}, codes
