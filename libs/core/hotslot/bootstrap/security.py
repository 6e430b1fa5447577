"""Transport security and authentication every service shares: the server's TLS credentials (mTLS when a client CA
is set), reloaded from disk when the files change; the channels a service opens to others (TLS, its client
certificate, its bearer token), rebuilt when their files change; and the bearer-token check with its two scopes."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from hotslot.bootstrap.interceptors import wrap_handler

log = logging.getLogger(__name__)

# Seconds between looks at a file's mtime for reloading (a look per call or per handshake would cost a stat each).
RELOAD_CHECK_S = 1.0


class SecurityConfigError(ValueError):
    """A TLS or token file that cannot be used (malformed, unreadable); the message names the file, never a secret."""


class Scope(IntEnum):
    """What a bearer token may do. A higher scope includes the lower ones: admin may also generate."""

    GENERATE = 1
    ADMIN = 2


# The scope each method needs. A method not listed needs ADMIN: a new RPC is closed until someone decides otherwise.
GENERATE_METHODS = frozenset({
    "/hotslot.router.v1.RouterService/Generate",
    "/hotslot.router.v1.RouterService/GenerateStream",
    "/hotslot.router.v1.RouterService/ListModels",
    "/hotslot.router.v1.RouterService/GetModel",
    "/hotslot.router.v1.RouterService/GetClusterStatus",
    "/hotslot.registry.v1.RegistryService/GetModel",
    "/hotslot.registry.v1.RegistryService/ListModels",
    "/hotslot.registry.v1.RegistryService/WatchModels",
    "/hotslot.executor.v1.ExecutorService/Generate",
    "/hotslot.executor.v1.ExecutorService/GenerateStream",
    "/hotslot.executor.v1.ExecutorService/GetStatus",
    "/hotslot.executor.v1.ExecutorService/WatchStatus",
    # What an executor needs from its storage-cache to serve a generate: views, and leases on them.
    "/hotslot.storage.v1.StorageCacheService/EnsureModel",
    "/hotslot.storage.v1.StorageCacheService/EnsureModelStream",
    "/hotslot.storage.v1.StorageCacheService/Pin",
    "/hotslot.storage.v1.StorageCacheService/RenewLease",
    "/hotslot.storage.v1.StorageCacheService/Unpin",
    "/hotslot.storage.v1.StorageCacheService/GetUsage",
    # The Open Inference Protocol (KServe v2) on the router: inference and the read calls Triton clients make.
    # Its repository calls (load, unload) are not listed, so they need admin.
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ServerMetadata",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/inference.GRPCInferenceService/ModelInfer",
})

# Services open to anyone who can connect: probes (Kubernetes, load balancers, `hotslot up`) carry no token, and
# reflection only describes the API, whose .proto files are public anyway (grpcurl needs it to call anything).
OPEN_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def required_scope(method: str) -> Scope | None:
    """The scope `method` (/package.Service/Method) needs; None when it is open."""
    if method.startswith(OPEN_SERVICE_PREFIXES):
        return None
    return Scope.GENERATE if method in GENERATE_METHODS else Scope.ADMIN


class _WatchedFiles:
    """Notices, at most once per RELOAD_CHECK_S, that any of some files changed (mtime, size or inode)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self._stamp = self._read()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _read(self) -> tuple[tuple[int, int, int] | None, ...]:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def changed(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < RELOAD_CHECK_S:
                return False
            self._checked = now
            stamp = self._read()
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            return True


# -- tokens ------------------------------------------------------------------------------------------------------

class TokenTable:
    """Bearer tokens and their scopes, from a file of `TOKEN SCOPE` lines (`#` comments and blank lines allowed;
    SCOPE is `generate` or `admin`). Reloaded when the file changes; a file that no longer parses keeps the
    tokens last read (and says so in the log). Tokens are compared in constant time and never logged."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._tokens = parse_tokens(self.path.read_text(), str(self.path))
        except (OSError, ValueError) as error:
            raise SecurityConfigError(f"tokens_file: {error}") from None
        self._watch = _WatchedFiles([self.path])

    def scope_of(self, token: str) -> Scope | None:
        if self._watch.changed():
            try:
                self._tokens = parse_tokens(self.path.read_text(), str(self.path))
                log.info("reloaded %d tokens from %s", len(self._tokens), self.path)
            except (OSError, ValueError) as error:
                log.warning("keeping the previous tokens: cannot reload %s: %s", self.path, error)
        found: Scope | None = None
        # Digests of equal length, every entry compared (no early exit): the time taken says nothing about how
        # much of a token matched, nor how long the tokens are.
        candidate = hashlib.sha256(token.encode()).digest()
        for known, scope in self._tokens:
            if hmac.compare_digest(known, candidate) and (found is None or scope > found):
                found = scope
        return found


def parse_tokens(text: str, origin: str = "tokens") -> list[tuple[bytes, Scope]]:
    """(sha256 of the token, scope) for each `TOKEN SCOPE` line; ValueError (without the line) when malformed."""
    tokens: list[tuple[bytes, Scope]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1].upper() not in Scope.__members__:
            # The line itself is not echoed: it holds a secret.
            raise ValueError(f"{origin} line {number}: expected `TOKEN generate` or `TOKEN admin`")
        if len(parts[0]) < 16:
            raise ValueError(f"{origin} line {number}: a token must be at least 16 characters")
        tokens.append((hashlib.sha256(parts[0].encode()).digest(), Scope[parts[1].upper()]))
    if not tokens:
        raise ValueError(f"{origin}: no tokens (lines of `TOKEN SCOPE`)")
    return tokens


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without a valid `authorization: Bearer TOKEN` with UNAUTHENTICATED, and one whose token
    lacks the method's scope with PERMISSION_DENIED, before the servicer sees it. Health and reflection are open."""

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        needed = required_scope(method)
        if handler is None or needed is None:
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        if token is None:
            refusal = (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token: send `authorization: Bearer TOKEN` "
                       "(the CLI: --token or HOTSLOT_CLIENT_TOKEN)")
        else:
            scope = self.tokens.scope_of(token) if token else None
            if scope is None:
                refusal = (grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
            elif scope < needed:
                refusal = (grpc.StatusCode.PERMISSION_DENIED,
                           f"{method} needs a token of scope {needed.name.lower()}; this one has {scope.name.lower()}")
            else:
                return handler
        code, message = refusal
        log.warning("refused %s: %s", method, code.name)

        @asynccontextmanager
        async def refused(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            await context.abort(code, message)
            yield  # never reached: abort raises

        return wrap_handler(handler, refused)


# -- server credentials --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key (PEM files) and, for mTLS, the CA its clients' certificates must chain
    to."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


def _server_configuration(tls: ServerTls) -> grpc.ServerCertificateConfiguration:
    key, cert = tls.key_file.read_bytes(), tls.cert_file.read_bytes()
    ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    _check_pem(cert, key, ca, tls)
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def _check_pem(cert: bytes, key: bytes, ca: bytes | None, tls: ServerTls) -> None:
    """gRPC only says it could not bind when a file is not what it should be; say which file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError:
        raise SecurityConfigError(f"tls_cert_file {tls.cert_file}: no PEM certificate in it") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise SecurityConfigError(f"tls_key_file {tls.key_file}: not an unencrypted PEM private key") from None
    if private.public_key() != chain[0].public_key():
        raise SecurityConfigError(f"tls_key_file {tls.key_file} is not the key of tls_cert_file {tls.cert_file}")
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise SecurityConfigError(f"tls_client_ca_file {tls.client_ca_file}: no PEM certificate in it") from None


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """TLS credentials that re-read the files when they change on disk: gRPC asks before each new connection, and
    connections made later get the new certificate (open ones keep theirs). With a client CA, clients must present a
    certificate signed by it."""
    watch = _WatchedFiles([p for p in (tls.cert_file, tls.key_file, tls.client_ca_file) if p])

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        if not watch.changed():
            return None
        try:
            configuration = _server_configuration(tls)
        except (OSError, SecurityConfigError) as error:
            # Mid-rotation (a file replaced but not its partner yet): keep serving with the old one.
            log.warning("keeping the previous TLS certificate: cannot read the new one: %s", error)
            return None
        log.info("reloaded the TLS certificate from %s", tls.cert_file)
        return configuration

    # grpc takes None from `fetch` as "keep the current one"; typeshed's stub does not say so
    return grpc.dynamic_ssl_server_credentials(
        _server_configuration(tls), fetch,  # type: ignore[arg-type]
        require_client_authentication=tls.client_ca_file is not None,
    )


# -- client channels -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientSecurity:
    """How a service (or the CLI) calls another: TLS when `ca_file` is set (the CA that signed the servers'
    certificates), a client certificate for mTLS, a bearer token sent with every call, and the name to check the
    server's certificate against when it differs from the target's host (e.g. targets given as IP addresses)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    token_file: Path | None = None
    token: str | None = None
    server_name: str = ""

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def files(self) -> list[Path]:
        return [p for p in (self.ca_file, self.cert_file, self.key_file, self.token_file) if p is not None]

    def read_token(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text().strip() or None
        return self.token

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes() if self.ca_file else None,
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.tls and self.server_name else []

    def metadata(self) -> list[tuple[str, str]]:
        token = self.read_token()
        return [("authorization", f"Bearer {token}")] if token else []

    def check(self) -> None:
        """Raises ValueError when the settings are incomplete (a key without its certificate, files missing)."""
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both its certificate and its key file")
        if (self.cert_file is not None) and self.ca_file is None:
            raise ValueError("a client certificate needs TLS: set the CA file as well")
        for path in self.files():
            if not path.is_file():
                raise ValueError(f"{path}: no such file")


class _TokenClientInterceptor:
    """Adds `authorization: Bearer TOKEN` to every call (the token read when the channel was built)."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in self._metadata:
            metadata.add(key, value)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


class _TokenUnaryUnary(_TokenClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _TokenUnaryStream(_TokenClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _TokenStreamUnary(_TokenClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _TokenStreamStream(_TokenClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def token_interceptors(metadata: list[tuple[str, str]]) -> list[grpc.aio.ClientInterceptor]:
    if not metadata:
        return []
    return [_TokenUnaryUnary(metadata), _TokenUnaryStream(metadata), _TokenStreamUnary(metadata),
            _TokenStreamStream(metadata)]


def _build_channel(
    target: str, security: ClientSecurity, options: list[tuple[str, Any]], interceptors: list[grpc.aio.ClientInterceptor]
) -> grpc.aio.Channel:
    all_interceptors = [*interceptors, *token_interceptors(security.metadata())]
    if security.tls:
        return grpc.aio.secure_channel(target, security.channel_credentials(),
                                       options=[*options, *security.channel_options()], interceptors=all_interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=all_interceptors)


class _CurrentChannelCall:
    """A multi-callable that resolves the channel at call time, so a stub made once follows channel rebuilds."""

    def __init__(self, owner: ReloadingChannel, kind: str, method: str, kwargs: dict[str, Any]) -> None:
        self._owner, self._kind, self._method, self._kwargs = owner, kind, method, kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        return getattr(channel, self._kind)(self._method, **self._kwargs)(*args, **kwargs)


class ReloadingChannel(grpc.aio.Channel):
    """A grpc.aio channel that is rebuilt when its CA, certificate, key or token file changes on disk (gRPC
    Python has no client credentials that reload themselves). Calls already running finish on the old channel,
    which is closed after `old_channel_grace_s`."""

    def __init__(self, target: str, security: ClientSecurity, options: list[tuple[str, Any]], interceptors: list[grpc.aio.ClientInterceptor],
                 old_channel_grace_s: float = 600.0) -> None:
        self._target, self._security, self._options, self._interceptors = target, security, options, interceptors
        self._grace = old_channel_grace_s
        self._watch = _WatchedFiles(security.files())
        self._channel = _build_channel(target, security, options, interceptors)
        self._retired: set[asyncio.Task[None]] = set()

    def current(self) -> grpc.aio.Channel:
        if self._watch.changed():
            try:
                fresh = _build_channel(self._target, self._security, self._options, self._interceptors)
            except (OSError, ValueError) as error:
                log.warning("keeping the channel to %s: cannot read the new TLS files or token: %s", self._target, error)
                return self._channel
            old, self._channel = self._channel, fresh
            log.info("rebuilt the channel to %s with the new TLS files or token", self._target)
            task = asyncio.get_running_loop().create_task(old.close(self._grace))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        return self._channel

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool = False,
    ) -> Any:
        return _CurrentChannelCall(self, "unary_unary", method, dict(
            request_serializer=request_serializer, response_deserializer=response_deserializer,
            _registered_method=_registered_method))

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool = False,
    ) -> Any:
        return _CurrentChannelCall(self, "unary_stream", method, dict(
            request_serializer=request_serializer, response_deserializer=response_deserializer,
            _registered_method=_registered_method))

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool = False,
    ) -> Any:
        return _CurrentChannelCall(self, "stream_unary", method, dict(
            request_serializer=request_serializer, response_deserializer=response_deserializer,
            _registered_method=_registered_method))

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool = False,
    ) -> Any:
        return _CurrentChannelCall(self, "stream_stream", method, dict(
            request_serializer=request_serializer, response_deserializer=response_deserializer,
            _registered_method=_registered_method))

    async def close(self, grace: float | None = None) -> None:
        for task in list(self._retired):
            task.cancel()
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    async def __aenter__(self) -> ReloadingChannel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        await self.close(None)


def client_channel(
    target: str,
    security: ClientSecurity | None,
    *,
    options: list[tuple[str, Any]],
    interceptors: list[grpc.aio.ClientInterceptor],
) -> grpc.aio.Channel:
    """A channel to `target`: plaintext without TLS settings or a token (exactly as before), else TLS and/or the
    bearer token, rebuilt when their files change."""
    if security is None or (not security.tls and security.token_file is None and not security.token):
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if not security.files():
        return _build_channel(target, security, options, interceptors)
    return ReloadingChannel(target, security, options, interceptors)


def sync_channel(target: str, security: ClientSecurity | None) -> grpc.Channel:
    """A blocking channel (the CLI, launchers): TLS when `security` has a CA. The token is the caller's to send
    (`security.metadata()`)."""
    if security is None or not security.tls:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, security.channel_credentials(), options=security.channel_options())


def service_channel(
    target: str,
    *,
    security: ClientSecurity | None,
    tracer_provider: Any = None,
    options: Sequence[tuple[str, Any]] | None = None,
    max_message_bytes: int | None = None,
) -> grpc.aio.Channel:
    """The channel one service opens to another: traced calls carrying the trace context, the message-size limits,
    and `security` (TLS, client certificate, bearer token; None or empty: plaintext as before). `options` override
    the message-size limits. Must be called with the event loop running."""
    from hotslot.bootstrap.settings import DEFAULT_MAX_MESSAGE_BYTES
    from hotslot.bootstrap.telemetry import client_interceptors, message_size_options

    merged = dict(message_size_options(max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES))
    merged.update(dict(options or ()))
    return client_channel(target, security, options=list(merged.items()),
                          interceptors=client_interceptors(tracer_provider))
