"""`hotslot up`: the whole cluster on this machine, in the foreground until Ctrl-C or SIGTERM."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hotslot.cli.client import make_console
from hotslot.cluster.local import ClusterSpec, LocalCluster

console = make_console(stderr=True)


def up(
    state_dir: Annotated[Path, typer.Option(help="Directory for the share, cache, database and logs.")] = Path(".hotslot"),
    executors: Annotated[int, typer.Option(min=1, help="Number of executors.")] = 2,
    device: Annotated[str, typer.Option(help="Device of every executor: cpu, or cuda (one GPU each: use one executor per GPU).")] = "cpu",
    host: Annotated[str, typer.Option(help="Address the services listen on.")] = "127.0.0.1",
    auto_ports: Annotated[bool, typer.Option(help="Pick free ports instead of 50050 (router), 50051 (registry), 50052 (storage-cache), 50053+ (executors), and 9460-9463+ for their metrics.")] = False,
    cache_capacity: Annotated[str, typer.Option(help="Capacity of the node-local cache, e.g. 20GiB.")] = "20GiB",
    otel: Annotated[str, typer.Option(help="Where spans go: none, console (into each service's log) or otlp.")] = "none",
    otlp_endpoint: Annotated[str, typer.Option(help="OTLP/gRPC collector for --otel otlp, e.g. http://localhost:4317.")] = "",
    executor_arg: Annotated[list[str] | None, typer.Option(help="Extra flag passed to every executor (repeatable), e.g. --executor-arg=--standby-budget-bytes=8GiB.")] = None,
) -> None:
    """Start registry, storage-cache, executors and router as separate processes; stop them all on Ctrl-C."""
    if otel not in ("none", "console", "otlp"):
        raise typer.BadParameter("use none, console or otlp", param_hint="--otel")
    spec = ClusterSpec(
        state_dir=state_dir, executors=executors, host=host, auto_ports=auto_ports, device=device,
        cache_capacity=cache_capacity, executor_args=list(executor_arg or []), otel=otel, otlp_endpoint=otlp_endpoint,
    )
    cluster = LocalCluster(spec, on_progress=lambda msg: console.log(msg))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            with console.status("starting the cluster (executors load torch; first start takes a while)"):
                cluster.start()
        except (RuntimeError, TimeoutError) as error:
            last = [line for line in str(error).splitlines() if line.strip()][-3:]
            console.print(f"[red]error[/red]: {str(error).splitlines()[0]}\n  " + "\n  ".join(last))
            if "bind" in str(error) or "listen" in str(error):
                console.print("a port is in use: stop the other cluster, or pass --auto-ports")
            console.print(f"logs: {spec.logs}")
            raise typer.Exit(1) from None
        table = Table(title="hotslot is up", show_lines=False)
        table.add_column("service")
        table.add_column("address")
        table.add_column("metrics")
        table.add_column("log")
        for name, svc in cluster.services.items():
            table.add_row(name, svc.address, svc.metrics_url, str(svc.log_path))
        out = make_console()
        out.print(table)
        out.print(
            f"share: {spec.share}   (put models here, then `hotslot models register ID SOURCE`)\n"
            f"try:   hotslot generate --router {cluster.address('router')} -m MODEL \"a prompt\" -o out.png\n"
            f"       grpcurl -plaintext {cluster.address('router')} list\n"
            + (f"traces: {'each service log under ' + str(spec.logs) if otel == 'console' else otlp_endpoint or 'OTLP default endpoint'}\n" if otel != "none" else "")
            + "Ctrl-C stops everything."
        )
        while not stop.wait(1.0):
            dead = cluster.dead()
            if dead:
                console.log(f"[red]{', '.join(dead)} exited; stopping the cluster (see {spec.logs})")
                break
    finally:
        codes = cluster.stop()
        if codes:
            console.log("stopped: " + ", ".join(f"{n} ({c})" for n, c in codes.items()))
