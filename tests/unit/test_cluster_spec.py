"""`hotslot up`'s executor flags: on CPU the executors split the cores instead of each taking all of them."""
from __future__ import annotations

import pytest

from hotslot.cluster.local import ClusterSpec, cpu_thread_args


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTSLOT_EXECUTOR_TORCH_THREADS", raising=False)


def test_cpu_executors_split_the_cores() -> None:
    assert cpu_thread_args(ClusterSpec(executors=2), cpus=8) == ["--torch-threads", "4"]
    assert cpu_thread_args(ClusterSpec(executors=3), cpus=2) == ["--torch-threads", "1"]


def test_threads_set_by_the_user_or_a_gpu_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_thread_args(ClusterSpec(executors=2, device="cuda"), cpus=8) == []
    assert cpu_thread_args(ClusterSpec(executors=2, executor_args=["--torch-threads=3"]), cpus=8) == []
    assert cpu_thread_args(ClusterSpec(executors=2, executor_args=["--torch-threads", "3"]), cpus=8) == []
    monkeypatch.setenv("HOTSLOT_EXECUTOR_TORCH_THREADS", "2")
    assert cpu_thread_args(ClusterSpec(executors=2), cpus=8) == []
