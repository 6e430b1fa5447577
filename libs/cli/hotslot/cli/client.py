"""Client commands of the `hotslot` CLI: generate (with progress bars), models list/show/register/upload, status.
They talk to the router (and, to register or upload, to the registry and storage-cache) over gRPC: plaintext, or
TLS (mTLS with a client certificate) and a bearer token with --ca/--cert/--key/--token or HOTSLOT_CLIENT_*."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from hotslot.bootstrap.security import ClientSecurity, sync_channel
from hotslot.common.v1 import common_pb2
from hotslot.registry.v1 import registry_service_pb2 as rpb
from hotslot.registry.v1 import registry_service_pb2_grpc as rgrpc
from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc
from hotslot.storage.v1 import storage_cache_service_pb2 as spb
from hotslot.storage.v1 import storage_cache_service_pb2_grpc as sgrpc


def make_console(stderr: bool = False) -> Console:
    """Rich wraps at 80 columns when output is not a terminal (pipes, CI logs, `make`): tables there get the
    width of COLUMNS, or 200."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "200"))
    return Console(stderr=stderr, width=width)


console = make_console()
err_console = make_console(stderr=True)

RouterOpt = Annotated[str, typer.Option(envvar="HOTSLOT_CLIENT_ROUTER", help="Router host:port.")]
RegistryOpt = Annotated[str, typer.Option(envvar="HOTSLOT_CLIENT_REGISTRY", help="Registry host:port.")]
StorageOpt = Annotated[str, typer.Option(envvar="HOTSLOT_CLIENT_STORAGE", help="Storage-cache host:port.")]
CaOpt = Annotated[Path | None, typer.Option(
    "--ca", envvar="HOTSLOT_CLIENT_CA", help="PEM CA the services' certificates chain to; turns TLS on.")]
CertOpt = Annotated[Path | None, typer.Option(
    "--cert", envvar="HOTSLOT_CLIENT_CERT", help="PEM client certificate, for services that require one (mTLS).")]
KeyOpt = Annotated[Path | None, typer.Option(
    "--key", envvar="HOTSLOT_CLIENT_KEY", help="PEM private key of --cert.")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", envvar="HOTSLOT_CLIENT_TOKEN", show_default=False,
    help="Bearer token (scope generate, or admin to register, upload, preload).")]
UPLOAD_CHUNK_BYTES = 1024 * 1024
TIER_NAMES = {v: k.removeprefix("TIER_").lower() for k, v in common_pb2.Tier.items()}
PHASE_NAMES = {v: k.removeprefix("LOAD_PHASE_").lower() for k, v in common_pb2.LoadPhase.items()}
EVICT_NAMES = {v: k.removeprefix("EVICT_OUTCOME_").lower() for k, v in pb.EvictOutcome.items()}
PLACEMENT_NAMES = {v: k.removeprefix("PLACEMENT_REASON_").lower() for k, v in pb.PlacementReason.items()}

models_app = typer.Typer(no_args_is_help=True, help="List, show, register and upload models.")


def _security(ca: Path | None, cert: Path | None, key: Path | None, token: str | None) -> ClientSecurity:
    security = ClientSecurity(ca_file=ca, cert_file=cert, key_file=key, token=token or None)
    try:
        security.check()
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    return security


def _router_call(router: str, security: ClientSecurity, method: str, request: Any, timeout: float) -> Any:
    """One unary call of the router's `method`; an error is printed (code, reason, message) and exits."""
    with sync_channel(router, security) as channel:
        try:
            return getattr(pb_grpc.RouterServiceStub(channel), method)(request, timeout=timeout,
                                                                       metadata=security.metadata())
        except grpc.RpcError as err:
            raise _fail(err) from None


def _fail(err: grpc.RpcError) -> typer.Exit:
    reason = _reason(err)
    err_console.print(f"[red]error[/red] {err.code().name}{f' ({reason})' if reason else ''}: {err.details()}",
                      markup=True, highlight=False)
    if err.code() == grpc.StatusCode.UNAUTHENTICATED:
        err_console.print("pass a token with --token or HOTSLOT_CLIENT_TOKEN (`hotslot up --tls` prints one)")
    if err.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (err.details() or ""):
        err_console.print("is the cluster running (`hotslot up`)? pass its address with --router/--registry/--storage "
                          "or HOTSLOT_CLIENT_ROUTER/_REGISTRY/_STORAGE")
    return typer.Exit(1)


def _reason(err: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason every hotslot error carries (README, Clients); empty when there is none."""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]  # a failed call's RpcError is also its Call
    except ValueError:
        return ""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def ms(duration) -> float:
    return duration.ToNanoseconds() / 1e6


def _labels(values: list[str] | None) -> dict[str, str]:
    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r}: use KEY=VALUE", param_hint="--label")
        out[key] = value
    return out


def _adapter_ref(item: str) -> common_pb2.AdapterRef:
    """`ADAPTER` or `ADAPTER:SCALE` -> an AdapterRef (scale unset: the executor's 1.0)."""
    model_id, sep, scale = item.partition(":")
    if not sep:
        return common_pb2.AdapterRef(model=common_pb2.ModelRef(model_id=model_id))
    try:
        value = float(scale)
    except ValueError:
        raise typer.BadParameter(f"{item!r}: use ADAPTER or ADAPTER:SCALE with a number", param_hint="--lora") from None
    return common_pb2.AdapterRef(model=common_pb2.ModelRef(model_id=model_id), scale=value)


def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model id: a pipeline, or a LoRA adapter (runs on its base).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write (-0, -1 ... added for several).")] = Path("out.png"),
    negative: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    steps: Annotated[int, typer.Option(help="Denoising steps; 0 = executor default.")] = 0,
    guidance: Annotated[float | None, typer.Option(
        help="Guidance scale, 0 to the executor's max_guidance (50 by default); 0 turns guidance off "
             "(distilled models); unset = executor default.")] = None,
    width: Annotated[int, typer.Option(help="Width, multiple of 8; 0 = executor default.")] = 0,
    height: Annotated[int, typer.Option(help="Height, multiple of 8; 0 = executor default.")] = 0,
    seed: Annotated[int | None, typer.Option(
        help="Seed; the same seed and inputs give the same image; unset = random (the one used is printed).")] = None,
    num_images: Annotated[int, typer.Option(help="Images to generate.")] = 1,
    revision: Annotated[int, typer.Option(help="Model revision; 0 = latest.")] = 0,
    lora: Annotated[list[str] | None, typer.Option(
        "--lora", help="LoRA adapter to apply, ADAPTER or ADAPTER:SCALE (default scale 1.0); repeat to stack them, "
        "all on the base given with -m (or the base of the adapter given with -m).")] = None,
    router: RouterOpt = "127.0.0.1:50050",
    timeout: Annotated[float, typer.Option(help="Deadline in seconds.")] = 600.0,
    ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None, token: TokenOpt = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result (paths, tier, timings, trace id) as JSON.")] = False,
) -> None:
    """Generate images through the router, with progress while the model loads and denoises."""
    # The request starts a W3C trace here, so its id can be looked up in any tracing backend afterwards.
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    security = _security(ca, cert, key, token)
    metadata = [("traceparent", f"00-{trace_id}-{span_id}-01"), *security.metadata()]
    request = pb.GenerateStreamRequest(
        model=common_pb2.ModelRef(model_id=model, revision=revision),
        params=common_pb2.GenerationParams(prompt=prompt, negative_prompt=negative, steps=steps, guidance_scale=guidance,
                                           width=width, height=height, seed=seed, num_images=num_images),
        adapters=[_adapter_ref(item) for item in lora or ()],
    )
    result = None
    with sync_channel(router, security) as channel, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, disable=quiet or json_out, transient=False,
    ) as progress:
        load = progress.add_task(f"{model}: queued", total=None)
        denoise = None
        try:
            for event in pb_grpc.RouterServiceStub(channel).GenerateStream(request, timeout=timeout, metadata=metadata):
                if event.HasField("load"):
                    progress.update(load, description=f"{model}: {PHASE_NAMES.get(event.load.phase, 'loading')}")
                elif event.HasField("step"):
                    if denoise is None:
                        progress.update(load, description=f"{model}: loaded", total=1, completed=1)
                        denoise = progress.add_task("denoising", total=event.step.total_steps)
                    progress.update(denoise, completed=event.step.step)
                elif event.HasField("result"):
                    result = event.result
        except grpc.RpcError as err:
            raise _fail(err) from None
    if result is None:
        err_console.print("[red]error[/red]: the router closed the stream without a result")
        raise typer.Exit(1)
    r = result
    paths = [output] if len(r.images) == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(r.images))]
    for path, image in zip(paths, r.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.data)
    t = r.timings
    if json_out:
        phases = ("queue", "ensure", "read", "materialize", "swap", "denoise", "encode", "total")
        print(json.dumps({
            "paths": [str(p) for p in paths], "model": r.model.model_id, "revision": r.model.revision,
            "executor": r.executor_id, "tier": TIER_NAMES.get(r.tier, "?"), "placement": PLACEMENT_NAMES.get(result.placement_reason, "?"),
            "attempted": list(result.attempted_executor_ids), "trace_id": trace_id,
            "seeds": [image.seed for image in r.images],
            "adapters": [{"model": a.model.model_id, "revision": a.model.revision, "scale": round(a.scale, 6),
                          "tier": TIER_NAMES.get(a.tier, "?")} for a in r.adapters],
            "timings_ms": {p: round(ms(getattr(t, p)), 3) for p in phases},
        }))
        return
    adapters = "".join(f" +{a.model.model_id}@{a.model.revision}:{a.scale:g}({TIER_NAMES.get(a.tier, '?')})"
                       for a in r.adapters)
    console.print(
        f"wrote {', '.join(map(str, paths))}  model={r.model.model_id}@{r.model.revision}{adapters} executor={r.executor_id} "
        f"tier={TIER_NAMES.get(r.tier, '?')} placement={PLACEMENT_NAMES.get(result.placement_reason, '?')}\n"
        f"  queue {ms(t.queue):.1f} ms  ensure {ms(t.ensure):.1f}  read {ms(t.read):.1f}  materialize "
        f"{ms(t.materialize):.1f}  swap {ms(t.swap):.2f}  denoise {ms(t.denoise):.1f}  encode {ms(t.encode):.1f}  "
        f"total {ms(t.total):.1f} ms  seed {r.images[0].seed if r.images else '-'}  trace {trace_id}"
    )


@models_app.command("list")
def models_list(
    kind: Annotated[str, typer.Option(help="pipeline, lora or empty for all.")] = "",
    label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE filter (repeatable).")] = None,
    router: RouterOpt = "127.0.0.1:50050",
    ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None, token: TokenOpt = None,
) -> None:
    """List registered models (latest revision of each)."""
    kinds: dict[str, common_pb2.ModelKind] = {"": common_pb2.MODEL_KIND_UNSPECIFIED, "pipeline": common_pb2.MODEL_KIND_DIFFUSERS_PIPELINE, "lora": common_pb2.MODEL_KIND_LORA_ADAPTER}
    if kind not in kinds:
        raise typer.BadParameter("use pipeline or lora", param_hint="--kind")
    table = Table("model", "rev", "kind", "class", "files", "MB", "labels")
    security = _security(ca, cert, key, token)
    page_token = ""
    with sync_channel(router, security) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        while True:
            try:
                page = stub.ListModels(pb.ListModelsRequest(
                    page_size=200, page_token=page_token, kind=kinds[kind], labels=_labels(label)), timeout=30,
                    metadata=security.metadata())
            except grpc.RpcError as err:
                raise _fail(err) from None
            for m in page.models:
                table.add_row(m.model_id, str(m.revision), common_pb2.ModelKind.Name(m.kind).removeprefix("MODEL_KIND_"),
                              m.manifest.pipeline_class, str(len(m.manifest.files)), f"{m.manifest.total_bytes / 1e6:.1f}",
                              ",".join(f"{k}={v}" for k, v in sorted(m.labels.items())))
            page_token = page.next_page_token
            if not page_token:
                break
    console.print(table)


@models_app.command("show")
def models_show(
    model_id: Annotated[str, typer.Argument(help="Model id.")],
    revision: Annotated[int, typer.Option(help="Revision; 0 = latest.")] = 0,
    router: RouterOpt = "127.0.0.1:50050",
    ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None, token: TokenOpt = None,
) -> None:
    """Show one model with every file's size and sha256."""
    security = _security(ca, cert, key, token)
    m = _router_call(router, security, "GetModel", pb.GetModelRequest(model_id=model_id, revision=revision), 30).model
    console.print(f"[bold]{m.model_id}[/bold] revision {m.revision}  {common_pb2.ModelKind.Name(m.kind)}  "
                  f"{m.manifest.pipeline_class}  digest={m.manifest.digest[:16]}")
    table = Table("path", "bytes", "sha256")
    for f in m.manifest.files:
        table.add_row(f.path, str(f.size_bytes), f.sha256)
    console.print(table)


@models_app.command("register")
def models_register(
    model_id: Annotated[str, typer.Argument(help="Model id ([a-z0-9][a-z0-9._-]*).")],
    source: Annotated[str, typer.Argument(help="Directory relative to the models root (the share).")],
    lora_base: Annotated[str, typer.Option(help="Register a LoRA adapter for this base model.")] = "",
    label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE (repeatable).")] = None,
    registry: RegistryOpt = "127.0.0.1:50051",
    ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None, token: TokenOpt = None,
) -> None:
    """Register a model already on the share (hashes every file)."""
    _register(registry, model_id, source, lora_base, _labels(label), _security(ca, cert, key, token))


def _register(registry: str, model_id: str, source: str, lora_base: str, labels: dict[str, str],
              security: ClientSecurity) -> None:
    kind = common_pb2.MODEL_KIND_LORA_ADAPTER if lora_base else common_pb2.MODEL_KIND_DIFFUSERS_PIPELINE
    with sync_channel(registry, security) as channel, err_console.status(f"registering {model_id} (hashing files)"):
        try:
            reply = rgrpc.RegistryServiceStub(channel).RegisterModel(rpb.RegisterModelRequest(
                model_id=model_id, kind=kind, base_model_id=lora_base, source=source, labels=labels), timeout=3600,
                metadata=security.metadata())
        except grpc.RpcError as err:
            raise _fail(err) from None
    m = reply.model
    state = "new revision" if reply.created else "unchanged"
    console.print(f"{m.model_id} revision {m.revision} ({state}): {len(m.manifest.files)} files, "
                  f"{m.manifest.total_bytes / 1e6:.1f} MB, digest {m.manifest.digest[:16]}")


@models_app.command("upload")
def models_upload(
    model_id: Annotated[str, typer.Argument(help="Model id to register.")],
    directory: Annotated[Path, typer.Argument(help="Local diffusers directory to upload.", exists=True, file_okay=False)],
    dest: Annotated[str, typer.Option(help="Destination under the share; default models/<model_id>.")] = "",
    lora_base: Annotated[str, typer.Option(help="Register as a LoRA adapter for this base model.")] = "",
    label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE (repeatable).")] = None,
    storage: StorageOpt = "127.0.0.1:50052",
    registry: RegistryOpt = "127.0.0.1:50051",
    overwrite: Annotated[bool, typer.Option(
        help="Replace files that already exist under the destination (never files a registered model names: "
        "upload a new revision to a new --dest instead).")] = False,
    ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None, token: TokenOpt = None,
) -> None:
    """Stream a local model directory to the share through the storage-cache (write-through), then register it.
    Files that exist already are refused unless --overwrite."""
    security = _security(ca, cert, key, token)
    dest = dest or f"models/{model_id}"
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    with sync_channel(storage, security) as channel, Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
        console=err_console,
    ) as progress:
        task = progress.add_task(f"uploading {len(files)} files", total=total)
        stub = sgrpc.StorageCacheServiceStub(channel)
        for path in files:
            rel = path.relative_to(directory).as_posix()
            progress.update(task, description=rel)
            parts = _put_parts(path, f"{dest}/{rel}", _sha256(path), lambda n: progress.advance(task, n), overwrite)
            try:
                stub.PutFile(parts, timeout=3600, metadata=security.metadata())
            except grpc.RpcError as err:
                raise _fail(err) from None
    _register(registry, model_id, dest, lora_base, _labels(label), security)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(UPLOAD_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _put_parts(path: Path, dest: str, sha256: str, advance, overwrite: bool = False):
    """The PutFile stream: a header (with the sha256 the storage-cache must verify), then the bytes in chunks."""
    yield spb.PutFileRequest(header=spb.PutFileHeader(path=dest, expected_sha256=sha256, size_bytes=path.stat().st_size,
                                                      overwrite=overwrite))
    with open(path, "rb") as f:
        while block := f.read(UPLOAD_CHUNK_BYTES):
            advance(len(block))
            yield spb.PutFileRequest(chunk=block)


def preload(
    model: Annotated[str, typer.Argument(help="Model id.")],
    revision: Annotated[int, typer.Option(help="Model revision; 0 = latest.")] = 0,
    replicas: Annotated[int, typer.Option(min=1, help="Executors to warm it on (all live ones when fewer).")] = 1,
    router: RouterOpt = "127.0.0.1:50050",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the loads.")] = 600.0,
    ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None, token: TokenOpt = None,
) -> None:
    """Load a model into standby on one or more executors ahead of a known burst (router Preload)."""
    security = _security(ca, cert, key, token)
    request = pb.PreloadRequest(model=common_pb2.ModelRef(model_id=model, revision=revision), replicas=replicas)
    reply = _router_call(router, security, "Preload", request, timeout)
    for r in reply.replicas:
        console.print(f"{r.model.model_id}@{r.model.revision} on {r.executor_id}: {TIER_NAMES.get(r.tier, '?')}")
    if len(reply.replicas) < replicas:
        console.print(f"[yellow]{len(reply.replicas)} of {replicas} replicas: fewer live executors[/yellow]")


def status(
    router: RouterOpt = "127.0.0.1:50050",
    ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None, token: TokenOpt = None,
) -> None:
    """Show every executor the router knows: state, what it holds in which tier (LoRA adapters too), queue depth."""
    security = _security(ca, cert, key, token)
    reply = _router_call(router, security, "GetClusterStatus", pb.GetClusterStatusRequest(), 30)
    table = Table("executor", "address", "state", "device", "queue", "active", "standby", "host", "adapters",
                  "held MB (shared saves)", "preloader")
    for e in reply.executors:
        held: dict[int, list[str]] = {tier: [] for tier in (common_pb2.TIER_ACTIVE, common_pb2.TIER_STANDBY, common_pb2.TIER_HOST)}
        for m in e.models:
            held.setdefault(m.tier, []).append(f"{m.model.model_id}@{m.model.revision}")
        table.add_row(
            e.executor_id, e.address, common_pb2.ExecutorState.Name(e.state).removeprefix("EXECUTOR_STATE_").lower(), e.device,
            f"{e.queue_depth}/{e.queue_capacity}", *(", ".join(held[t]) for t in held if t in (1, 2, 3)),
            ", ".join(f"{a.model.model_id}@{a.model.revision} ({TIER_NAMES.get(a.tier, '?')})" for a in e.adapters),
            _held_mb(e),
            f"pid {e.preloader.pid}" + ("" if e.preloader.alive else " (down)") + (f", {e.preloader.restarts} restarts" if e.preloader.restarts else ""),
        )
    console.print(table)
    for address in getattr(reply, "unreachable_addresses", []):
        console.print(f"[yellow]unreachable:[/yellow] {address}")
    console.print(f"router queue: {reply.router_queue_depth}")


def _held_mb(executor) -> str:
    """Bytes the executor's tiers hold, and what holding shared components (VAE, text encoder) once saves against
    every model keeping its own copy."""
    used = sum(t.used_bytes for t in executor.tiers)
    separate = sum(m.size_bytes for m in executor.models) + sum(a.size_bytes for a in executor.adapters)
    return f"{used / 1e6:.1f} ({max(0, separate - used) / 1e6:.1f})"


def evict(
    model: Annotated[str, typer.Argument(help="Model id.")],
    revision: Annotated[int, typer.Option(help="Model revision; 0 = every revision held.")] = 0,
    executor: Annotated[str, typer.Option(help="Only on this executor id; empty = every executor holding it.")] = "",
    router: RouterOpt = "127.0.0.1:50050",
    timeout: Annotated[float, typer.Option(help="Deadline in seconds.")] = 60.0,
    ca: CaOpt = None, cert: CertOpt = None, key: KeyOpt = None, token: TokenOpt = None,
) -> None:
    """Drop a model from the executors holding it (router Evict); one in use is dropped when its requests end."""
    security = _security(ca, cert, key, token)
    request = pb.EvictRequest(model=common_pb2.ModelRef(model_id=model, revision=revision), executor_id=executor)
    reply = _router_call(router, security, "Evict", request, timeout)
    if not reply.results:
        console.print(f"no executor holds {model}")
    for r in reply.results:
        detail = f"{r.freed_bytes / 1e6:.1f} MB freed" + (f", {r.pending_bytes / 1e6:.1f} MB when its requests end"
                                                          if r.pending_bytes else "")
        console.print(f"{r.executor_id}: {EVICT_NAMES.get(r.outcome, '?')}  "
                      f"{r.message if r.outcome == pb.EVICT_OUTCOME_FAILED else detail}")
