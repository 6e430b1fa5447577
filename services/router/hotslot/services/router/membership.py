"""Which executors exist and what each last reported: targets from a static list and/or a DNS name re-resolved
periodically (every address record is one executor, as with a Kubernetes headless Service), one task per target
following its WatchStatus stream, and the router's own in-flight counts per executor."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from hotslot.bootstrap.settings import format_address

from .downstream import ExecutorClient, ExecutorConnector
from .placement import Candidate

log = logging.getLogger(__name__)

# host, port -> every "host:port" target the name resolves to.
Resolve = Callable[[str, int], Awaitable[set[str]]]


async def resolve_addresses(host: str, port: int) -> set[str]:
    """Every A/AAAA record of `host` as a target with `port`."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return {format_address(str(info[4][0]), port) for info in infos}


def split_host_port(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{target!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass(eq=False)
class ExecutorLink(Candidate):
    """One executor target: its client, the task following its status, and placement's view of it."""

    address: str = ""
    client: ExecutorClient | None = None
    task: asyncio.Task[None] | None = None
    removed: bool = False
    """No longer a target (it left the DNS answer); closed once the requests on it finish."""
    status_epoch: int = 0
    """Counts statuses received, so a finished request knows whether the latest status came after it was sent."""


@dataclass(frozen=True)
class Slot:
    """One request counted in flight on an executor; given back with ExecutorMembership.release."""

    link: ExecutorLink
    status_epoch: int
    work_s: float = 0.0
    """The request's estimated work there (load and service), as placement estimated it."""
    model: tuple[str, int] = ("", 0)


class ExecutorMembership:
    """Keeps one ExecutorLink per target. Listeners (plain callables) run after every change that can alter
    placement: a status, a connect or disconnect, a target added or removed, a request finished."""

    def __init__(
        self,
        connector: ExecutorConnector,
        *,
        static_targets: Iterable[str] = (),
        dns_target: str = "",
        dns_refresh_s: float = 5.0,
        watch_backoff_s: float = 0.5,
        watch_backoff_max_s: float = 10.0,
        resolve: Resolve = resolve_addresses,
    ) -> None:
        self._connector = connector
        self._static = list(dict.fromkeys(static_targets))
        self._dns = split_host_port(dns_target) if dns_target else None
        self.dns_target = dns_target
        self.dns_refresh_s = dns_refresh_s
        self.watch_backoff_s = watch_backoff_s
        self.watch_backoff_max_s = watch_backoff_max_s
        self._resolve = resolve
        self._links: dict[str, ExecutorLink] = {}
        self._dns_targets: set[str] = set()
        self._placeable: list[ExecutorLink] = []
        self._listeners: list[Callable[[], None]] = []
        self._refresher: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Adds the static targets and, with a DNS name, resolves it once now and then every dns_refresh_s."""
        for address in self._static:
            self._add(address)
        if self._dns is not None:
            await self.refresh_dns()
            self._refresher = asyncio.create_task(self._refresh_forever(), name="router-dns-refresh")
        self._changed()

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        links = list(self._links.values())
        self._links.clear()
        for link in links:
            await self._close_link(link)
        await asyncio.gather(*self._closing, return_exceptions=True)
        self._changed()

    # -- what placement and the cluster status read ------------------------------------------------------
    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def placeable(self) -> list[ExecutorLink]:
        """Connected executors with a status, one per executor id, ordered by id."""
        return self._placeable

    def unreachable_addresses(self) -> list[str]:
        return sorted(address for address, link in self._links.items() if not link.connected)

    def targets(self) -> list[str]:
        return sorted(self._links)

    # -- the router's traffic ------------------------------------------------------------------------------
    def reserve(self, link: ExecutorLink, *, work_s: float = 0.0, model: tuple[str, int] = ("", 0)) -> Slot:
        """Counts a request sent to `link` (called in the same step as placement chose it): `work_s` is placement's
        estimate of its load and service there, `model` its (model id, revision), which it will make resident."""
        link.count_sent(work_s, model)
        return Slot(link, link.status_epoch, work_s, model)

    def release(self, slot: Slot) -> None:
        """Counts a request as finished; may let a waiting request in."""
        link = slot.link
        link.count_finished(slot.work_s, slot.model, before_next_status=slot.status_epoch == link.status_epoch)
        if link.removed and link.inflight == 0:
            self._close_later(link)
        self._changed()

    # -- DNS -----------------------------------------------------------------------------------------------
    async def refresh_dns(self) -> None:
        """Re-resolves the DNS name: new addresses join, vanished ones leave. A failed lookup keeps the last
        answer, so a DNS hiccup does not empty the cluster."""
        assert self._dns is not None
        host, port = self._dns
        try:
            found = await self._resolve(host, port)
        except OSError as error:
            log.warning("cannot resolve executors at %s (%s); keeping %d known", self.dns_target, error,
                        len(self._dns_targets))
            return
        joined, left = found - self._dns_targets, self._dns_targets - found
        self._dns_targets = found
        for address in sorted(joined):
            self._add(address)
        for address in sorted(left):
            if address not in self._static:
                self._remove(address)
        if joined or left:
            log.info("executors at %s: %d (+%d -%d)", self.dns_target, len(found), len(joined), len(left))
            self._changed()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.dns_refresh_s)
            await self.refresh_dns()

    # -- links -------------------------------------------------------------------------------------------
    def _add(self, address: str) -> None:
        if address in self._links:
            return
        link = ExecutorLink(address=address, client=self._connector.connect(address))
        link.task = asyncio.create_task(self._follow(link), name=f"router-watch-{address}")
        self._links[address] = link
        log.info("executor target added: %s", address)

    def _remove(self, address: str) -> None:
        link = self._links.pop(address, None)
        if link is None:
            return
        log.info("executor target removed: %s", address)
        link.removed = True
        link.connected = False
        if link.task is not None:
            link.task.cancel()
        if link.inflight == 0:
            self._close_later(link)

    def _close_later(self, link: ExecutorLink) -> None:
        task = asyncio.get_running_loop().create_task(self._close_link(link))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_link(link: ExecutorLink) -> None:
        if link.task is not None:
            link.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link.task
        if link.client is not None:
            await link.client.close()

    async def _follow(self, link: ExecutorLink) -> None:
        """Follows the executor's status for as long as it is a target, reconnecting with exponential backoff.
        While the stream is down the executor gets no requests."""
        assert link.client is not None
        backoff = self.watch_backoff_s
        while True:
            version = -1
            try:
                async for snapshot in link.client.watch_status():
                    # Versions restart with the stream (an executor restart resets them); within one stream an
                    # older version is a late duplicate.
                    if snapshot.version < version:
                        continue
                    version = snapshot.version
                    if not link.connected:
                        log.info("executor %s at %s connected", snapshot.executor_id, link.address)
                    link.status_received(snapshot, asyncio.get_running_loop().time())
                    link.connected = True
                    link.status_epoch += 1
                    backoff = self.watch_backoff_s
                    self._changed()
                reason = "stream ended"
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure means "not reachable now"; retried below
                reason = getattr(error, "message", None) or type(error).__name__
            if link.connected:
                log.warning("executor %s at %s lost (%s); no requests go there until it is back",
                            link.executor_id, link.address, reason)
                link.connected = False
                self._changed()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.watch_backoff_max_s)

    def _changed(self) -> None:
        self._placeable = _one_per_executor(self._links.values())
        for listener in self._listeners:
            listener()


def _one_per_executor(links: Iterable[ExecutorLink]) -> list[ExecutorLink]:
    """Connected links with a status, ordered by executor id. Two addresses reaching one executor (a name with an
    A and an AAAA record, or a static target also found by DNS) count once: the smallest address is kept."""
    by_id: dict[str, ExecutorLink] = {}
    for link in sorted(links, key=lambda link: link.address):
        if link.connected and link.snapshot is not None:
            by_id.setdefault(link.executor_id, link)
    return [by_id[executor_id] for executor_id in sorted(by_id)]
