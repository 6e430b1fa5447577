"""`make gpu-check` (tests/gpu/gpu_check.py): it refuses a machine without CUDA at once with the reason, and its
one table carries the bench's numbers however the bench's table grows columns; on a CUDA machine the loading
check passes. Without CUDA (CI) the GPU test skips."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("gpu_check", HERE / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

BENCH_OUTPUT = """
executor benchmark: x86_64 16 CPUs, torch 2.11.0+cu130, diffusers 0.42.1 (...), device cuda, float16; load average
models: SD1.5-shaped StableDiffusionPipeline A and B (UNets differ), 2.13 GB fp16 safetensors each, 2.13 GB as float16

| files -> weights | diffusers load+1st | hotslot 1st Generate | ratio | read GB/s | limit GB/s |
|------------------|--------------------|----------------------|-------|-----------|------------|
| float16 -> float16 | 4.10 s           | 1.10 s               | 3.73  | 5.00      | 20.00      |

| measure                                                       | value                      | ratio | goal    | limit |
|---------------------------------------------------------------|----------------------------|-------|---------|-------|
| (a) diffusers from_pretrained (fp16 files -> float16)          | 3.20 s                     |       |         |       |
| (a) diffusers load + first image                              | 4.00 s                     | 1.00  |         |       |
| (a) hotslot cold, node cache empty: first Generate (tier DISK) | 2.00 s                     | 2.00  |         |       |
|       ensure / read / materialize / swap                      | 1.00 / 0.50 / 0.20 / 0.00 s |       |         |       |
|       load phases summed; ratio = from_pretrained / this      | 1.70 s                     | 1.88  |         |       |
| (a) hotslot cold, files in node cache: first Generate (tier DISK) | 1.00 s                  | 4.00  |         |       |
|       ensure / read / materialize / swap                      | 0.01 / 0.42 / 0.20 / 0.00 s |       |         |       |
|       load phases summed; ratio = from_pretrained / this      | 0.63 s                     | 5.08  |         |       |
| (a) hotslot PNG == diffusers PNG (same seed and params)        | yes                        |       |         |       |
| (b) swap standby -> active, p50 (24 swaps; tiers: 24 STANDBY) | 0.012 ms                   |       | <= 1 ms |       |
| (b) swap standby -> active, p99 / max                          | 0.030 ms / 0.041 ms        |       |         |       |
"""


def test_without_cuda_it_exits_2_at_once_saying_there_is_no_cuda_device(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    done = subprocess.run([sys.executable, str(HERE / "gpu_check.py"), "--wheels", str(tmp_path / "none"),
                           "--logs", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "gpu-check: FAIL: no CUDA device" in done.stderr


def test_the_table_carries_the_benchs_cold_load_swap_and_bandwidth_rows() -> None:
    """Whatever other tables the bench prints first, and whatever columns its main table grows."""
    step = gpu_check.Step(rc=0, stdout=BENCH_OUTPUT, seconds=170.0)
    rows = {r.check: r for r in gpu_check.bench_rows(BENCH_OUTPUT, step, limit_mb_s=50_000.0, device="cuda")}
    assert all(r.result != "FAIL" for r in rows.values()), rows
    cold = rows["cold load (node cache empty): hotslot first Generate; ratio = diffusers / hotslot"]
    assert (cold.value, cold.ratio, cold.against) == ("2.00 s", "2.00", "diffusers load + first image 4.00 s")
    assert rows["swap standby -> active, p50 (24 swaps; tiers: 24 STANDBY)"].value == "0.012 ms"
    assert rows["swap standby -> active, p99 / max"].value == "0.030 ms / 0.041 ms"
    assert rows["hotslot PNG == diffusers PNG (same seed and params)"].result == "PASS"
    read = rows["host->cuda: executor read phase, 2.13 GB model, files in node cache"]
    assert (read.value, read.against, read.ratio) == ("5.1 GB/s", "pinned copy 50.0 GB/s", "0.10 of limit")


def test_a_row_the_bench_no_longer_prints_is_a_failure_not_a_silent_gap() -> None:
    text = BENCH_OUTPUT.replace("(b) swap standby -> active, p50", "(b) something else")
    rows = gpu_check.bench_rows(text, gpu_check.Step(rc=0, stdout=text, seconds=1.0), None, "cuda")
    assert [r.result for r in rows if r.check.startswith("swap")] == ["FAIL"]


def test_a_loading_check_that_found_other_memory_fails_its_row() -> None:
    check = {"device": "cuda", "failures": ["check_preloader"], "reader_bit_identical": True,
             "image_bit_identical_as_stored": True, "image_bit_identical_fp16": False, "image_max_abs_diff_fp16": 0.5}
    rows, limit = gpu_check.check_rows(check, gpu_check.Step(rc=1, stdout="", seconds=3.0), "cuda")
    results = {r.check: r.result for r in rows}
    assert results["preloader child -> parent via CUDA IPC: zero copy"] == "FAIL"
    assert results["load_pipeline image == diffusers image (fp16)"] == "FAIL"
    assert results["reader == safetensors.load_file bit for bit (as stored, to fp16)"] == "PASS"
    assert limit is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_loading_check_passes_on_cuda() -> None:
    done = subprocess.run([sys.executable, str(HERE / "check_cuda_loading.py"), "--size-mb", "64"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
