"""`make demo`: the whole system on this machine. Writes a family of tiny models and three LoRA adapters on one of
them into a local share, starts the cluster (registry, storage-cache, two executors, router as separate processes),
registers the models and runs a mixed workload (full fine-tunes, adapters as models, adapters stacked on their base)
through the router with the `hotslot` CLI, writes the PNGs to ./out/, prints one row per request
and one trace per request (received by an OTLP sink started here), then shuts everything down."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
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


def hotslot(*args: str) -> str:
    done = subprocess.run([*HOTSLOT, *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": str(console.width)})
    if done.returncode != 0:
        raise SystemExit(f"`hotslot {' '.join(args)}` failed:\n{done.stderr}")
    return done.stdout


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(STATE, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    sink = TraceSink(STATE / "traces.jsonl").start()
    spec = ClusterSpec(state_dir=STATE, executors=2, auto_ports=True, otel="otlp", otlp_endpoint=sink.endpoint,
                       executor_args=["--default-width", "64", "--default-height", "64", "--default-steps", "8",
                                      "--max-width", "256", "--max-height", "256", "--torch-threads", "1"])
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
    finally:
        codes = cluster.stop()
        sink.stop()
    console.print(f"\nimages in {OUT}/, logs in {spec.logs}/, traces in {sink.out}")
    console.print(f"cluster stopped ({', '.join(f'{n}={c}' for n, c in codes.items())}); "
                  f"demo took {time.monotonic() - started:.0f} s")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
