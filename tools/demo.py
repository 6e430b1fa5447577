"""`make demo`: the whole system on this machine. Writes a family of tiny models and three LoRA adapters on one of
them into a local share, starts the cluster (registry, storage-cache, two executors, router as separate processes),
registers the models and runs a mixed workload (full fine-tunes, adapters as models, adapters stacked on their base)
through the router with the `hotslot` CLI, writes the PNGs to ./out/, prints one row per request
and one trace per request (received by an OTLP sink started here), then shuts everything down.

The cluster runs as `hotslot up --tls` does: TLS with client certificates between everything, and bearer tokens
(the CLI gets them through HOTSLOT_CLIENT_*). `python tools/demo.py --plaintext` runs it without."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hotslot.cluster.local import ClusterSpec, LocalCluster
from hotslot.cluster.trace_sink import TraceSink
from hotslot.modelgen import write_family
from hotslot.modelgen.lora import write_lora

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".hotslot" / "demo"
OUT = ROOT / "out"
HOTSLOT = [sys.executable, "-m", "hotslot.cli.main"]
MODELS = 4
# LoRA adapters on tiny-sd-0: PEFT names on the UNet, UNet + text encoder, kohya/A1111 names.
ADAPTERS = {"tiny-lora-a": {}, "tiny-lora-b": {"text_encoder": True}, "tiny-lora-k": {"fmt": "kohya"}}
# Two lanes of requests, as two clients would send them: repeats (active), switches (standby/host, lookahead),
# adapters as the model (they run on their base) and stacked on the base with scales ("MODEL+ADAPTER:SCALE").
WORKLOAD = [
    ["tiny-sd-0", "tiny-sd-0", "tiny-lora-a", "tiny-sd-1", "tiny-sd-0+tiny-lora-a:0.5+tiny-lora-k", "tiny-sd-2",
     "tiny-lora-b"],
    ["tiny-sd-3", "tiny-sd-2", "tiny-sd-3", "tiny-lora-k", "tiny-sd-1", "tiny-lora-a", "tiny-sd-0"],
]
PROMPTS = ["a lighthouse at dusk", "a red fox in snow", "a bowl of ramen", "a sailboat, watercolor"]

WIDTH = 200  # rich wraps at 80 columns when output is not a terminal (make, CI logs)
console = Console(width=max(WIDTH, shutil.get_terminal_size().columns))
CLIENT_ENV: dict[str, str] = {}  # HOTSLOT_CLIENT_* of the running cluster (CA, certificate, token)


def hotslot(*args: str) -> str:
    done = subprocess.run([*HOTSLOT, *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": str(console.width), **CLIENT_ENV})
    if done.returncode != 0:
        raise SystemExit(f"`hotslot {' '.join(args)}` failed:\n{done.stderr}")
    return done.stdout


def print_metrics(cluster: LocalCluster) -> None:
    """A few counters from each service's Prometheus endpoint (README, Metrics), as an operator would scrape them."""
    from prometheus_client.parser import text_string_to_metric_families

    def by_label(samples: list, name: str, label: str) -> str:
        return " ".join(f"{s.labels[label]}={s.value:g}" for s in samples if s.name == name and s.value) or "-"

    console.print("\n[bold]metrics[/bold] (Prometheus text format, each service's /metrics):")
    for name, svc in cluster.services.items():
        with urllib.request.urlopen(svc.metrics_url, timeout=10) as reply:
            samples = [s for f in text_string_to_metric_families(reply.read().decode()) for s in f.samples]
        total = {s.name: 0.0 for s in samples}
        for s in samples:
            total[s.name] += s.value
        rpcs = f"rpcs={total.get('hotslot_grpc_server_requests_total', 0):g}"
        if name == "router":
            detail = f"placements {by_label(samples, 'hotslot_router_placements_total', 'reason')}"
        elif name.startswith("executor"):
            detail = (f"served from {by_label(samples, 'hotslot_executor_requests_total', 'tier')}, "
                      f"models read into memory {sum(s.value for s in samples if s.labels.get('phase') == 'read' and s.name == 'hotslot_executor_load_duration_seconds_count'):g}")
        elif name == "storage-cache":
            detail = (f"file hits={total.get('hotslot_storage_cache_hits_total', 0):g} "
                      f"misses={total.get('hotslot_storage_cache_misses_total', 0):g}, "
                      f"fetched {total.get('hotslot_storage_cache_fetched_bytes_total', 0) / 2**20:.1f} MiB")
        else:
            detail = f"by method {by_label(samples, 'hotslot_grpc_server_requests_total', 'grpc_method')}"
        console.print(f"  {name:<14} {svc.metrics_url:<32} {rpcs:<9} {detail}")


def main(argv: list[str]) -> int:
    tls = "--plaintext" not in argv
    started = time.monotonic()
    shutil.rmtree(STATE, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    sink = TraceSink(STATE / "traces.jsonl").start()
    spec = ClusterSpec(state_dir=STATE, executors=2, auto_ports=True, otel="otlp", otlp_endpoint=sink.endpoint,
                       executor_args=["--default-width", "64", "--default-height", "64", "--default-steps", "8",
                                      "--max-width", "256", "--max-height", "256", "--torch-threads", "1"],
                       tls=tls)
    with console.status("writing a family of tiny models (shared VAE and text encoder)"):
        models = write_family(spec.share / "tiny", MODELS, prefix="tiny-sd")
    console.print(f"wrote {len(models)} tiny Stable Diffusion pipelines under {spec.share / 'tiny'}")
    for seed, (name, kind) in enumerate(ADAPTERS.items(), start=1):
        write_lora(spec.share / "loras" / name, models[0], seed=seed, **kind)
    console.print(f"wrote {len(ADAPTERS)} LoRA adapters for {models[0].name} under {spec.share / 'loras'}")
    cluster = LocalCluster(spec, on_progress=lambda msg: console.log(msg))
    try:
        with console.status("starting registry, storage-cache, 2 executors and the router"):
            cluster.start()
        CLIENT_ENV.update(cluster.client_env())
        if tls:
            console.print(f"TLS + client certificates + tokens on every service (credentials in {spec.tls_dir})")
        router, registry = cluster.address("router"), cluster.address("registry")
        for model in models:
            console.print(hotslot("models", "register", model.name, f"tiny/{model.name}", "--label", "demo=1",
                                  "--registry", registry).strip())
        for name in ADAPTERS:
            console.print(hotslot("models", "register", name, f"loras/{name}", "--lora-base", models[0].name,
                                  "--label", "demo=1", "--registry", registry).strip())

        def lane(index: int) -> list[dict]:
            rows = []
            for n, spec_ in enumerate(WORKLOAD[index]):
                model, *stacked = spec_.split("+")
                out = OUT / f"lane{index}-{n}-{model}.png"
                prompt = PROMPTS[(index + n) % len(PROMPTS)]
                loras = [arg for adapter in stacked for arg in ("--lora", adapter)]
                rows.append(json.loads(hotslot("generate", "-m", model, *loras, prompt, "-o", str(out), "--seed",
                                               str(n), "--router", router, "--json")))
            return rows

        with console.status("running the workload through the router"), ThreadPoolExecutor(2) as pool:
            lanes = list(pool.map(lane, range(len(WORKLOAD))))
        table = Table(title="requests (two clients in parallel)")
        for col in ("#", "model", "adapters (scale, from)", "executor", "tier", "placement", "queue ms", "load ms",
                    "swap ms", "denoise ms", "total ms", "image"):
            table.add_column(col, justify="right" if col.endswith("ms") else "left")
        for index, rows in enumerate(lanes):
            for n, row in enumerate(rows):
                t = row["timings_ms"]
                load = t["ensure"] + t["read"] + t["materialize"]
                adapters = ", ".join(f"{a['model']} {a['scale']:g} ({a['tier']})" for a in row.get("adapters", []))
                table.add_row(f"{index}.{n}", row["model"], adapters or "-", row["executor"], row["tier"],
                              row["placement"],
                              f"{t['queue']:.1f}", f"{load:.1f}", f"{t['swap']:.3f}", f"{t['denoise']:.1f}",
                              f"{t['total']:.1f}", Path(row["paths"][0]).name)
        console.print(table)
        console.print(hotslot("status", "--router", router))
        evicted = lanes[0][0]["model"]
        console.print(f"[bold]evict[/bold] {evicted} from every executor holding it (router Evict):")
        console.print(hotslot("evict", evicted, "--router", router))
        # Spans are exported in batches; give the last ones a moment to arrive.
        wanted = {row["trace_id"] for rows in lanes for row in rows}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not wanted <= set(sink.traces()):
            time.sleep(0.2)
        traces = sink.traces()
        first = lanes[0][0]["trace_id"]
        spans = traces.get(first, [])
        console.print(f"\n[bold]traces[/bold]: {sum(len(traces.get(t, [])) for t in wanted)} spans in "
                      f"{len(wanted & set(traces))} traces (one per request) -> {sink.out}")
        console.print(f"trace {first} (request 0.0) crosses {sorted({s['service'] for s in spans})}:")
        by_id = {s["span_id"]: s for s in spans}

        def depth(span: dict) -> int:
            d = 0
            while span["parent_span_id"] in by_id:
                span, d = by_id[span["parent_span_id"]], d + 1
            return d

        for span in sorted(spans, key=lambda s: s["start_ns"]):
            console.print(f"  {'  ' * depth(span)}{span['service']:<22} {span['name']:<55} "
                          f"{(span['end_ns'] - span['start_ns']) / 1e6:9.2f} ms")
        print_metrics(cluster)
    finally:
        codes = cluster.stop()
        sink.stop()
    console.print(f"\nimages in {OUT}/, logs in {spec.logs}/, traces in {sink.out}")
    console.print(f"cluster stopped ({', '.join(f'{n}={c}' for n, c in codes.items())}); "
                  f"demo took {time.monotonic() - started:.0f} s")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
