"""`make gpu-check`: the CUDA loading check and the executor benchmark on one GPU in one run, reported as one table.

Made for the device machine (README, "GPU check"): its own python3 with torch, no network, no hotslot installed.

1. Exits 2 at once, with the reason, when torch is missing or sees no CUDA device.
2. Installs the wheels that `make gpu-wheels` put in --wheels into --site (no index, no deps), puts the site after
   hotslot's source roots on PYTHONPATH (every child inherits it: the services start as
   `python -m hotslot.cli.main serve ...`, see hotslot.cluster.process), and checks that the carried and the
   image's packages import and meet every requirement of hotslot and of the carried wheels.
3. Runs tests/gpu/check_cuda_loading.py (reader, CUDA IPC hand-off, images vs diffusers; reader vs the
   pinned-copy limit) and bench/bench_executor.py on the device, with the bench sized to fit --budget-s.
4. Prints one table: PASS/FAIL per check, and the measures against their baselines (cold load vs diffusers, swap
   p50/p99, host-to-device bandwidth vs pinned copy, the IPC hand-off). Exit 0 when every check passed.

Each step's output goes to --logs ($OUT on the device machine, so it comes back; else build/gpu-check).

    python3 tests/gpu/gpu_check.py                 # what `make gpu-check` runs
    python3 tests/gpu/gpu_check.py --device cpu    # the same flow on CPU: a rehearsal of everything but CUDA
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# hotslot is a namespace package over one root per distribution (libs/<name>, services/<name>: README, "Layout");
# the repo root holds tests.support, which the bench starts the services with. They go before the carried site so
# that nothing there can shadow them.
SOURCE_ROOTS = (*sorted(str(p.parent.relative_to(ROOT)) for p in ROOT.glob("[ls]*/*/hotslot/")), ".")
CHECK = ROOT / "tests" / "gpu" / "check_cuda_loading.py"
BENCH = ROOT / "bench" / "bench_executor.py"
BENCH_WORK = ROOT / "bench" / ".data" / "executor-work"  # where bench_executor leaves the services' logs
WHEELS = ROOT / ".whl"
SITE = Path("/tmp/hotslot-gpu-site")
# The bound is 8 minutes on one GPU; a device command may run 10. The CPU budget is for a rehearsal.
BUDGET_S = {"cuda": 450.0, "cpu": 2400.0}
CHECK_TIMEOUT_S = {"cuda": 180.0, "cpu": 900.0}
MIN_BENCH_S = 60.0  # less than this left after the check: the bench is not started
KILL_GRACE_S = 15.0
CHECK_SIZE_MB = {"cuda": 1024, "cpu": 64}  # the synthetic file of the throughput numbers
# One cold start each, 24 swaps, one block of each workload: on an H200 the bench then takes ~3 minutes, model
# writing on the first run included (its (a) image stays at the bench's default 64 px, 2 steps: it times loading).
BENCH_ARGS = {
    "cuda": ["--repeat", "1", "--swaps", "24", "--requests", "4", "--rounds", "1"],
    "cpu": ["--repeat", "1", "--swaps", "4", "--requests", "2", "--rounds", "1"],
}
# Flags of newer benches, passed only where `bench_executor.py --help` lists them: (d) cold start by dtype, reduced
# to the pairing this run is about (fp16 files as fp16 weights on CUDA; as float32 on CPU).
BENCH_ARGS_IF_SUPPORTED = {
    "cuda": {"--pairings": "float16:float16"},
    "cpu": {"--pairings": "float16:float32"},
}
# What the check, the bench and the services they start import; anything missing fails here, before the clock.
IMPORTS = ("hotslot.cli.main", "hotslot.services.executor.wiring", "hotslot.services.registry.wiring",
           "hotslot.services.storage_cache.wiring", "hotslot.loading.pipeline_loader", "hotslot.loading.preloader",
           "hotslot.modelgen", "tests.support.procs", "diffusers", "transformers", "safetensors.torch")
# Carried although the image has them (tools/gpu_wheels.py FORCED): the import must find the carried copy.
SHADOWING = {"grpcio": "grpc", "protobuf": "google.protobuf", "typing-extensions": "typing_extensions"}
SHOWN_PROBLEMS = 8  # in the table; preflight.json has them all
MAX_CELL = 600  # characters of a problem in the table; the last line on stderr has it whole
VERSIONS = ("torch", "diffusers", "transformers", "huggingface-hub", "accelerate", "grpcio", "protobuf",
            "safetensors", "pydantic")
GB = 1e9


# -- the environment ---------------------------------------------------------------------------------------------
def cuda_problem(python: str, device: str) -> tuple[str, str]:
    """(problem, description of the device): problem is "" when `python` has torch and it sees the device."""
    probe = (
        "import json, torch; ok = torch.cuda.is_available(); d = {'torch': torch.__version__, 'cuda': torch.version.cuda,"
        " 'ok': ok, 'count': torch.cuda.device_count() if ok else 0};"
        " d.update(name=torch.cuda.get_device_name(), gib=torch.cuda.get_device_properties(0).total_memory / 2**30)"
        " if ok else None; print(json.dumps(d))"
    )
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"no CUDA device: cannot run {python}: {err}", ""
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"no CUDA device: torch is not importable by {python} ({last})", ""
    info = json.loads(done.stdout.strip().splitlines()[-1])
    torch_s = f"torch {info['torch']}, CUDA {info['cuda']}"
    if device == "cpu":
        return "", f"cpu (dry run), {torch_s}"
    if not info["ok"]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"no CUDA device: {torch_s} sees none"
                + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")), ""
    return "", f"{info['name']}, {info['gib']:.0f} GiB, {info['count']} visible; {torch_s}"


def install_wheels(python: str, wheels: Path, site: Path) -> tuple[int, str]:
    """(number of wheels, problem): installs every wheel of `wheels` into a fresh `site`, offline."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        return 0, ""
    shutil.rmtree(site, ignore_errors=True)
    done = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
         "--disable-pip-version-check", "--upgrade", "--target", str(site), *map(str, found)],
        capture_output=True, text=True)
    if done.returncode != 0:
        return len(found), f"pip install of {wheels} failed: {done.stderr.strip()[-1500:]}"
    return len(found), ""


def child_env(site: Path | None) -> dict[str, str]:
    paths = [str(ROOT / p) for p in SOURCE_ROOTS] + ([str(site)] if site else [])
    old = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",  # nothing can be fetched there; fail at once instead of retrying a hub
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # keeps the logs (and the device's output tail) to what matters
        "TOKENIZERS_PARALLELISM": "false",
    }


def preflight(wheels: Path, site: Path) -> dict:
    """Child mode, in the final environment: what is missing, shadowed or too old, and the versions in use."""
    import importlib
    import importlib.metadata as md
    import tomllib

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    problems: list[str] = []
    pinned = {}
    if (wheels / "requirements.txt").exists():
        for line in (wheels / "requirements.txt").read_text().split():
            name, _, version = line.partition("==")
            pinned[name] = version
    present = []
    for name, version in pinned.items():
        try:
            found = md.version(name)
            present.append(name)
        except md.PackageNotFoundError:
            found = "none"
        if found != version:
            problems.append(f"{name}: {found} found, {version} carried")
    for name, module in SHADOWING.items():
        if name in present:
            try:
                origin = getattr(importlib.import_module(module), "__file__", "") or ""
            except ImportError as err:
                origin = f"nowhere ({err})"
            if not origin.startswith(str(site)):
                problems.append(f"{module} comes from {origin}, not from the carried {name}")

    env = {**default_environment(), "extra": ""}
    # Every distribution of the monorepo (run from source here, so not installed): their third-party requirements.
    wanted = []
    for pyproject in sorted(p for p in {ROOT / r / "pyproject.toml" for r in SOURCE_ROOTS} if p.is_file()):
        project = tomllib.loads(pyproject.read_text())["project"]
        wanted += [(project["name"], r) for r in project["dependencies"] if not r.startswith("hotslot-")]
    for name in present:
        wanted += [(name, r) for r in md.requires(name) or []]
    for owner, line in wanted:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        try:
            found = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{owner} needs {req}: missing")
            continue
        if req.specifier and not req.specifier.contains(found, prereleases=True):
            problems.append(f"{owner} needs {req}: {found} installed")

    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - report every module that fails, with its error
            problems.append(f"import {module}: {type(err).__name__}: {err}")
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "none"
    return {"problems": problems, "versions": versions, "carried": len(pinned)}


# -- running the steps -------------------------------------------------------------------------------------------
@dataclass
class Step:
    rc: int | None  # None: killed at its timeout
    stdout: str
    seconds: float


def run_step(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> Step:
    """Runs `cmd` in its own process group; stderr is shown as it comes (progress) and both streams go to `log`.
    At the timeout the group gets SIGTERM, then SIGKILL (the services the bench starts die with it)."""
    t0 = time.perf_counter()
    out: list[str] = []
    with open(log, "w") as log_file:
        log_file.write(f"$ {shlex.join(cmd)}\n")
        log_file.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL)
        lock = threading.Lock()

        def pump(stream, sink: list[str] | None) -> None:
            for line in stream:
                with lock:
                    log_file.write(line)
                if sink is None:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                else:
                    sink.append(line)

        pumps = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
                 threading.Thread(target=pump, args=(proc.stderr, None), daemon=True)]
        for thread in pumps:
            thread.start()
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for thread in pumps:
            thread.join(10)
        with lock:
            log_file.write(f"\n# exit {rc} after {time.perf_counter() - t0:.0f} s\n")
    return Step(rc, "".join(out), time.perf_counter() - t0)


def bench_sizing(python: str, env: dict[str, str], kind: str) -> list[str]:
    """BENCH_ARGS, and those of BENCH_ARGS_IF_SUPPORTED that this bench's --help lists."""
    sizing = list(BENCH_ARGS[kind])
    optional = BENCH_ARGS_IF_SUPPORTED[kind]
    if optional:
        done = subprocess.run([python, str(BENCH), "--help"], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        for flag, value in optional.items():
            if re.search(rf"(^|\s){re.escape(flag)}\b", done.stdout):
                sizing += [flag, value]
    return sizing


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def services_tail(dest: Path, lines: int = 40) -> None:
    """The end of every service log the bench left, in one file (few files come back from the device)."""
    parts = []
    for log in sorted(BENCH_WORK.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()
        parts.append(f"==> {log.name} <==\n" + "\n".join(text[-lines:]))
    if parts:
        dest.write_text("\n\n".join(parts) + "\n")


# -- the bench's table -------------------------------------------------------------------------------------------
def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of the bench's main markdown table (the one with "measure" and "value" columns; the bench may
    print others), keyed by its lower-cased header cells, in order."""
    tables: list[list[dict[str, str]]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            tables.append([])
        elif not all(set(c) <= set("-: ") for c in cells):
            tables[-1].append(dict(zip(header, cells, strict=False)))
    return next((t for t in tables if t and {"measure", "value"} <= set(t[0])), [])


def find_row(rows: list[dict[str, str]], prefix: str, after: str = "") -> dict[str, str] | None:
    """The first row whose measure starts with `prefix` (and, with `after`, comes after the first row that starts
    with `after`)."""
    start = 0
    if after:
        start = next((i + 1 for i, r in enumerate(rows) if r.get("measure", "").startswith(after)), len(rows))
    return next((r for r in rows[start:] if r.get("measure", "").startswith(prefix)), None)


def seconds_of(value: str) -> float | None:
    """'12.345 ms' or '1.23 s' (the bench's `ms`) in seconds."""
    match = re.match(r"\s*([-+]?[\d.]+)\s*(ms|s)\b", value)
    if not match:
        return None
    return float(match.group(1)) / (1e3 if match.group(2) == "ms" else 1.0)


def phase_seconds(value: str) -> list[float]:
    """'0.01 / 0.52 / 0.10 / 0.00 s' -> [0.01, 0.52, 0.10, 0.0]."""
    return [float(x) for x in re.findall(r"[\d.]+", value)]


# -- the report --------------------------------------------------------------------------------------------------
@dataclass
class Row:
    check: str
    result: str  # PASS, FAIL, or "" for a measure
    value: str
    against: str = ""
    ratio: str = ""


def gbps(mb_s: float | None) -> str:
    return f"{mb_s / 1e3:.1f} GB/s" if mb_s else "n/a"


def check_rows(check: dict | None, step: Step | None, device: str) -> tuple[list[Row], float | None]:
    """The loading check's rows, and the pinned-copy limit (MB/s) it measured."""
    if check is None:
        why = "not run" if step is None else ("timed out" if step.rc is None else f"exit {step.rc}, no summary")
        return [Row("loading check (tests/gpu/check_cuda_loading.py)", "FAIL", f"{why}: see check.log")], None

    def passed(key: str) -> str:
        return "PASS" if check.get(key) is True else "FAIL"

    failures = check.get("failures", [])
    rows = [Row("loading check ran (tests/gpu/check_cuda_loading.py)", "PASS" if not failures else "FAIL",
                f"{step.seconds:.0f} s" + (f"; failed: {', '.join(failures)} (see check.log)" if failures else ""))]
    rows.append(Row("reader == safetensors.load_file bit for bit (as stored, to fp16)", passed("reader_bit_identical"),
                    "on " + check.get("device", device)))
    handoff = check.get("preloader_handoff", {})
    if handoff:
        alloc = handoff.get("parent_allocated_bytes")
        value = (f"child's write seen by parent (debug_fill); {handoff['wire_bytes']:,} B message for "
                 f"{handoff.get('weight_bytes', 0) / 1e6:.1f} MB in {handoff['files']} files"
                 + (f"; parent allocated {alloc:,} B" if alloc is not None else "")
                 + f"; hand-off {handoff['handoff_ms']} ms; owned_copy survives release")
    else:
        value = "not measured (see check.log)"
    ipc = "CUDA IPC" if device.startswith("cuda") else "shared memory (CPU)"
    rows.append(Row(f"preloader child -> parent via {ipc}: zero copy", passed("preloader_ipc_same_memory"), value))
    for label in ("as_stored", "fp16"):
        key = f"image_bit_identical_{label}"
        diff = check.get(f"image_max_abs_diff_{label}")
        timings = check.get(f"timings_{label}", {})
        value = "same bytes" if check.get(key) else ("not run" if key not in check else f"max |diff| {diff}")
        if timings:
            value += f"; load_pipeline {timings['wall_s']:.2f} s"
        rows.append(Row(f"load_pipeline image == diffusers image ({label.replace('_', ' ')})", passed(key), value))
    tp = check.get("throughput", {})
    limit = tp.get("pinned_h2d_copy_mb_s")
    against = f"pinned copy {gbps(limit)}" if limit else "pinned copy: n/a on cpu"
    for name, key in (("hotslot reader", "hotslot_reader_mb_s"), ("safetensors load_file", "safetensors_load_file_mb_s")):
        mb_s = tp.get(key)
        rows.append(Row(f"host->{device}: {name}, {tp.get('file_mb', '?')} MB file from page cache", "",
                        gbps(mb_s), against, f"{mb_s / limit:.2f} of limit" if mb_s and limit else ""))
    return rows, limit


def bench_rows(text: str, step: Step | None, limit_mb_s: float | None, device: str) -> list[Row]:
    if step is None:
        return [Row("executor bench (bench/bench_executor.py)", "FAIL", "not run: no time left after the check")]
    ran = step.rc == 0
    why = "" if ran else ("timed out" if step.rc is None else f"exit {step.rc}")
    rows = [Row("executor bench ran (bench/bench_executor.py)", "PASS" if ran else "FAIL",
                f"{step.seconds:.0f} s" + (f"; {why}: see bench.log and services.log" if why else ""))]
    table = table_rows(text)
    if not ran and not table:
        return rows

    def missing(what: str) -> Row:
        return Row(what, "FAIL", "row not found in the bench's table (see bench.log)")

    d_first = find_row(table, "(a) diffusers load + first image")
    d_load = find_row(table, "(a) diffusers from_pretrained")
    for label, prefix in (("node cache empty", "(a) hotslot cold, node cache empty"),
                          ("files in node cache", "(a) hotslot cold, files in node cache")):
        first = find_row(table, prefix)
        summed = find_row(table, "load phases summed", after=prefix)
        if first is None or d_first is None:
            rows.append(missing(f"cold load ({label})"))
            continue
        rows.append(Row(f"cold load ({label}): hotslot first Generate; ratio = diffusers / hotslot", "",
                        first["value"], f"diffusers load + first image {d_first['value']}", first.get("ratio", "")))
        if summed is None or d_load is None:
            rows.append(missing(f"  load phases only ({label})"))
        else:
            rows.append(Row(f"  load phases only ({label}) vs diffusers from_pretrained", "", summed["value"],
                            f"from_pretrained {d_load['value']}", summed.get("ratio", "")))
    same = find_row(table, "(a) hotslot PNG == diffusers PNG")
    if same is None:
        rows.append(missing("hotslot PNG == diffusers PNG"))
    else:
        rows.append(Row("hotslot PNG == diffusers PNG (same seed and params)",
                        "PASS" if same["value"] == "yes" else "FAIL", same["value"]))
    p50 = find_row(table, "(b) swap standby -> active, p50")
    p99 = find_row(table, "(b) swap standby -> active, p99")
    if p50 is None or p99 is None:
        rows.append(missing("swap standby -> active p50 / p99"))
    else:
        rows.append(Row("swap standby -> active, p50" + p50["measure"].removeprefix("(b) swap standby -> active, p50"),
                        "", p50["value"], f"goal {p50.get('goal', '') or '<= 1 ms'}"))
        rows.append(Row("swap standby -> active, p99 / max", "", p99["value"]))
    phases = find_row(table, "ensure / read", after="(a) hotslot cold, files in node cache")
    size = re.search(r"([\d.]+) GB fp16 safetensors each", text)
    if phases is not None and size is not None:
        read_s = phase_seconds(phases["value"])[1]
        mb_s = float(size.group(1)) * GB / read_s / 1e6 if read_s > 0 else None
        rows.append(Row(f"host->{device}: executor read phase, {size.group(1)} GB model, files in node cache", "",
                        gbps(mb_s), f"pinned copy {gbps(limit_mb_s)}" if limit_mb_s else "",
                        f"{mb_s / limit_mb_s:.2f} of limit" if mb_s and limit_mb_s else ""))
    return rows


def render(rows: list[Row]) -> str:
    head = Row("check", "result", "value", "against", "ratio")
    rows = [Row(*(" ".join(str(c).split()).replace("|", "/") for c in (r.check, r.result, r.value, r.against, r.ratio)))
            for r in rows]  # one line per row, whatever an error message holds
    cols = [max(len(getattr(r, f)) for r in [head, *rows]) for f in ("check", "result", "value", "against", "ratio")]

    def line(r: Row) -> str:
        cells = (r.check, r.result, r.value, r.against, r.ratio)
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, cols, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in cols) + "|"
    return "\n".join([line(head), sep, *map(line, rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu for a rehearsal of the flow")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with torch (the image's python3)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="wheels from `make gpu-wheels` (may be absent "
                        "where everything is installed)")
    parser.add_argument("--site", type=Path, default=SITE, help="where the wheels are installed (emptied first)")
    parser.add_argument("--logs", type=Path, default=None, help="default: $OUT if set, else build/gpu-check")
    parser.add_argument("--budget-s", type=float, default=None, help="whole run; default 450 on cuda")
    parser.add_argument("--bench-args", default=None, help="replace the bench's sizing flags (a quoted string)")
    parser.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.preflight:
        print(json.dumps(preflight(args.wheels, args.site)))
        return 0
    args.wheels, args.site = args.wheels.resolve(), args.site.resolve()  # the children run in ROOT
    device = args.device
    kind = "cpu" if device == "cpu" else "cuda"
    started = time.perf_counter()
    deadline = started + (args.budget_s or BUDGET_S[kind])
    logs = args.logs or (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "build" / "gpu-check")
    logs.mkdir(parents=True, exist_ok=True)

    def progress(message: str) -> None:
        print(f"[gpu-check {time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    problem, device_s = cuda_problem(args.python, device)
    if problem:
        print(f"gpu-check: FAIL: {problem}", file=sys.stderr)
        return 2
    progress(f"device: {device_s}")

    n_wheels, problem = install_wheels(args.python, args.wheels, args.site)
    versions = ""
    env = child_env(args.site if n_wheels else None)
    rows = [Row("CUDA device" if kind == "cuda" else "device (dry run on CPU)", "PASS", device_s)]
    if not problem:
        progress(f"{n_wheels} wheels installed from {args.wheels}; checking imports and requirements ...")
        done = subprocess.run([args.python, str(Path(__file__).resolve()), "--preflight", "--wheels", str(args.wheels),
                               "--site", str(args.site)], env=env, capture_output=True, text=True, cwd=ROOT)
        found = last_json(done.stdout)
        (logs / "preflight.json").write_text(json.dumps(found, indent=2) + "\n")
        if found is None:
            problem = f"preflight crashed: {done.stderr.strip()[-1500:]}"
        elif found["problems"]:
            shown = found["problems"][:SHOWN_PROBLEMS]
            more = len(found["problems"]) - len(shown)
            problem = "; ".join(shown) + (f"; {more} more in preflight.json" if more else "")
            if not n_wheels:
                problem = f"no wheels in {args.wheels}: run `make gpu-wheels` where there is a network and carry it; {problem}"
            elif "missing" in problem:
                problem += " (a package the image lacks: add it to tools/gpu_wheels.py's closure or FORCED)"
        versions = ", ".join(f"{k} {v}" for k, v in (found or {}).get("versions", {}).items())
    env_value = f"{n_wheels} carried wheels from {args.wheels.name}/" if n_wheels else "no wheels carried"
    rows.append(Row("packages: carried wheels + image import, requirements met", "FAIL" if problem else "PASS",
                    f"{env_value}; " + (problem[:MAX_CELL] if problem else f"{len(IMPORTS)} modules import")))
    if problem:
        print(render(rows))
        print(f"gpu-check: FAIL: packages: {problem}", file=sys.stderr)
        return 1

    progress("loading check (tests/gpu/check_cuda_loading.py) ...")
    check_cmd = [args.python, str(CHECK), "--device", device, "--size-mb", str(CHECK_SIZE_MB[kind])]
    step = run_step(check_cmd, env, min(CHECK_TIMEOUT_S[kind], deadline - time.perf_counter()), logs / "check.log")
    check = last_json(step.stdout)
    (logs / "check.json").write_text(json.dumps(check, indent=2) + "\n")
    new_rows, limit = check_rows(check, step, device)
    rows += new_rows

    bench_budget = deadline - time.perf_counter() - 5
    bench_step, bench_out = None, ""
    if bench_budget >= MIN_BENCH_S:
        sizing = shlex.split(args.bench_args) if args.bench_args is not None else bench_sizing(args.python, env, kind)
        progress(f"executor bench, {bench_budget:.0f} s left (bench/bench_executor.py --device {device} "
                 f"{shlex.join(sizing)}) ...")
        bench_step = run_step([args.python, str(BENCH), "--device", device, *sizing], env, bench_budget,
                              logs / "bench.log")
        bench_out = bench_step.stdout
        if bench_step.rc != 0:
            services_tail(logs / "services.log")
    rows += bench_rows(bench_out, bench_step, limit, device)

    failed = [r.check for r in rows if r.result == "FAIL"]
    elapsed = time.perf_counter() - started
    report = (f"\ngpu-check on {device_s}; whole run {elapsed:.0f} s (budget "
              f"{args.budget_s or BUDGET_S[kind]:.0f} s); logs in {logs}\npackages: {versions}\n\n{render(rows)}\n")
    print(report)
    (logs / "gpu-check.md").write_text(report)
    if failed:
        print(f"gpu-check: FAIL: {len(failed)} check(s): {'; '.join(failed)}", file=sys.stderr)
        return 1
    print("gpu-check: PASS", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
