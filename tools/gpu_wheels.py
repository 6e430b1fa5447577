"""Downloads, here (with a network), the wheels that hotslot needs on the GPU device image and that the image lacks.

The device (see README, "GPU check") runs the image's own python3 (3.12, torch 2.11+cu130) with no network. Its
package list is IMAGE below. Starting from hotslot's own requirements, every distribution not in IMAGE is carried,
and so are its requirements, recursively; a distribution in IMAGE is not (nor is what it requires: that is the
image's business), except the few in FORCED, which the image has at a version hotslot cannot rely on. Versions are
the ones this checkout's .venv uses, so the device runs what the tests ran. torch, triton and nvidia-* never travel.

    .venv/bin/python tools/gpu_wheels.py --dest .whl                                   # cp312, for the device
    .venv/bin/python tools/gpu_wheels.py --dest build/gpu-wheels-py311 --python-version 3.11   # a CPU rehearsal

`make gpu-wheels` runs the first. The folder gets one wheel per distribution (older versions are removed) and
`requirements.txt` (name==version, one a line), which `tests/gpu/gpu_check.py` checks after installing.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
# What travels to the device: tracked files + carried paths, at most 64 MiB in all (device README). The wheels
# must leave room for the working tree.
MAX_WHEELS_BYTES = 40 * MIB
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
NEVER = ("torch", "triton", "nvidia-")

# The device image's Python packages, as the device's KINDS.md lists them (read on a machine on 2026-11-17).
IMAGE = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize huggingface-hub hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())

# In the image, but carried anyway: the image's version is unknown and hotslot needs at least this checkout's.
FORCED = {
    "grpcio": "the generated *_pb2_grpc.py refuse a grpcio older than the generator's (1.85.1)",
    "protobuf": "the generated *_pb2.py need a protobuf 7 runtime (gencode 7.35.1; another major is refused)",
    "typing-extensions": "pydantic-core and opentelemetry need a recent one; a newer one is safe for the rest",
}


def target_environment(python_version: str) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=python_version, python_full_version=f"{python_version}.0", platform_machine="x86_64",
               sys_platform="linux", platform_system="Linux", implementation_name="cpython",
               platform_python_implementation="CPython", extra="")
    return env


def requirements_of(dist: str, env: dict[str, str]) -> list[str]:
    out = []
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            out.append(canonicalize_name(req.name))
    return out


def carried(python_version: str) -> dict[str, str]:
    """name -> version (this environment's) of every distribution to carry, hotslot's requirements first."""
    env = target_environment(python_version)
    todo, seen, out = requirements_of("hotslot", env), set(), {}
    while todo:
        name = todo.pop(0)
        if name in seen or name.startswith(NEVER):
            continue
        seen.add(name)
        if name.startswith("hotslot-"):  # this monorepo's own distributions: the device runs them from source
            todo.extend(requirements_of(name, env))
            continue
        if name in IMAGE and name not in FORCED:
            continue
        out[name] = md.version(name)
        todo.extend(requirements_of(name, env))
    return out


def download(dest: Path, python_version: str, wanted: dict[str, str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version}" for name, version in sorted(wanted.items())]
    cmd = [sys.executable, "-m", "pip", "download", "-qq", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "--dest", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *pins], check=True)


def tidy(dest: Path, wanted: dict[str, str]) -> list[Path]:
    """Keeps exactly one wheel per wanted distribution at the wanted version (two versions stop the install)."""
    kept = []
    for wheel in sorted(dest.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if wanted.get(name) == str(version) and all(k.name != wheel.name for k in kept):
            kept.append(wheel)
        else:
            wheel.unlink()
    missing = set(wanted) - {parse_wheel_filename(w.name)[0] for w in kept}
    if missing:
        raise SystemExit(f"no wheel downloaded for: {', '.join(sorted(missing))}")
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl", help="folder for the wheels (git-ignored)")
    parser.add_argument("--python-version", default="3.12", help="the device's python3 (3.12)")
    args = parser.parse_args()
    wanted = carried(args.python_version)
    download(args.dest, args.python_version, wanted)
    wheels = tidy(args.dest, wanted)
    (args.dest / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(wanted.items())))
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        reason = FORCED.get(parse_wheel_filename(wheel.name)[0], "")
        print(f"{wheel.stat().st_size / MIB:6.2f} MiB  {wheel.name}" + (f"  (image has it: {reason})" if reason else ""))
    print(f"{len(wheels)} wheels, {total / MIB:.1f} MiB in {args.dest}")
    if total > MAX_WHEELS_BYTES:
        print(f"too big: over {MAX_WHEELS_BYTES // MIB} MiB of the 64 MiB that travel to the device", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
