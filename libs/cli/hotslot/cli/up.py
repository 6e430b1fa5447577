"""`hotslot up`: the whole cluster on this machine, in the foreground until Ctrl-C or SIGTERM. A service that exits
is restarted (with backoff, within a restart budget) while the others keep serving."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hotslot.cli.client import make_console
from hotslot.cluster.local import ClusterSpec, CrashLoop, LocalCluster
from hotslot.cluster.supervision import RestartPolicy

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
    tls: Annotated[bool, typer.Option(help="Encrypt and authenticate everything: a throwaway CA and certificates under <state-dir>/tls, TLS with client certificates (mTLS) on every service, and bearer tokens. Prints the HOTSLOT_CLIENT_* lines the CLI needs.")] = False,
    token: Annotated[str, typer.Option(help="With --tls: your admin token (at least 16 characters); generated when empty.", show_default=False)] = "",
    restart_backoff_s: Annotated[float, typer.Option(min=0, help="Wait before restarting a service that exited; doubles with each further restart within --restart-window-s.")] = RestartPolicy.backoff_s,
    restart_backoff_max_s: Annotated[float, typer.Option(min=0, help="Longest wait before a restart.")] = RestartPolicy.backoff_max_s,
    max_restarts: Annotated[int, typer.Option(min=0, help="Restarts of one service allowed within --restart-window-s; one more exit stops the cluster (exit 1).")] = RestartPolicy.max_restarts,
    restart_window_s: Annotated[float, typer.Option(min=1, help="Window the restart budget counts over; a service up this long is back to a full budget.")] = RestartPolicy.window_s,
) -> None:
    """Start registry, storage-cache, executors and router as separate processes; restart one that exits; stop them
    all on Ctrl-C or SIGTERM, or when a service keeps crashing."""
    if otel not in ("none", "console", "otlp"):
        raise typer.BadParameter("use none, console or otlp", param_hint="--otel")
    if token and not tls:
        raise typer.BadParameter("tokens need --tls", param_hint="--token")
    if token and (len(token) < 16 or any(c.isspace() or c == "#" for c in token)):
        raise typer.BadParameter("use at least 16 characters, without spaces or '#'", param_hint="--token")
    if restart_backoff_max_s < restart_backoff_s:
        raise typer.BadParameter("must be at least --restart-backoff-s", param_hint="--restart-backoff-max-s")
    spec = ClusterSpec(
        state_dir=state_dir, executors=executors, host=host, auto_ports=auto_ports, device=device,
        cache_capacity=cache_capacity, executor_args=list(executor_arg or []), otel=otel, otlp_endpoint=otlp_endpoint,
        tls=tls, admin_token=token,
        restart=RestartPolicy(backoff_s=restart_backoff_s, backoff_max_s=restart_backoff_max_s,
                              max_restarts=max_restarts, window_s=restart_window_s),
    )
    cluster = LocalCluster(spec, on_progress=lambda msg: console.log(msg))
    stop = threading.Event()
    crash_loop: CrashLoop | None = None
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
        if tls and cluster.credentials is not None:
            c = cluster.credentials
            out.print(
                f"TLS with client certificates and tokens. For the CLI, run (or `source {spec.tls_dir / 'client.env'}`):\n"
                + "".join(f"  export {k}={v}\n" for k, v in cluster.client_env().items())
                + f"that token is admin; one that may only generate: {c.generate_token}\n"
                f"try:   hotslot generate -m MODEL \"a prompt\" -o out.png\n"
                f"       grpcurl -cacert {c.ca} -cert {c.client_cert} -key {c.client_key} "
                f"-H \"authorization: Bearer $HOTSLOT_CLIENT_TOKEN\" {cluster.address('router')} list",
                soft_wrap=True,  # lines to copy and paste: never broken
            )
        out.print(
            f"share: {spec.share}   (put models here, then `hotslot models register ID SOURCE`)\n"
            + ("" if tls else
               f"try:   hotslot generate --router {cluster.address('router')} -m MODEL \"a prompt\" -o out.png\n"
               f"       grpcurl -plaintext {cluster.address('router')} list\n")
            + (f"traces: {'each service log under ' + str(spec.logs) if otel == 'console' else otlp_endpoint or 'OTLP default endpoint'}\n" if otel != "none" else "")
            + "A service that exits is restarted; Ctrl-C stops everything."
        )
        while not stop.wait(0.2):
            try:
                cluster.supervise()
            except CrashLoop as error:
                crash_loop = error
                console.log(f"[red]{error}")
                break
    finally:
        codes = cluster.stop()
        if codes:
            console.log("stopped: " + ", ".join(f"{n} ({c})" for n, c in codes.items()))
    if crash_loop is not None:
        console.print(f"[red]error[/red]: the cluster stopped because {crash_loop}")
        raise typer.Exit(1)
