"""The storage-cache leases of the models and adapters the executor holds: renewed while they are held, released
when they leave (and the weights' shared components lose a user)."""
from __future__ import annotations

import asyncio
import logging

from .downstream import ViewProvider
from .ports import SharedParts
from .slots import SlotEntry, SlotManager

log = logging.getLogger(__name__)


class Leases:
    def __init__(self, views: ViewProvider, slots: SlotManager, ttl_s: float) -> None:
        self.views = views
        self.slots = slots
        self.ttl_s = ttl_s
        self.tasks: list[asyncio.Task[None]] = []  # unpins under way

    def on_evict(self, entry: SlotEntry) -> None:
        """A model (or adapter) left the slot manager: its weights and its lease go."""
        log.info("evicted %s (%d bytes)", entry.key, entry.size_bytes)
        if isinstance(entry.weights, SharedParts):
            entry.weights.release()  # shared components lose a user; the last frees them
        if entry.lease_id:
            task = asyncio.get_running_loop().create_task(self.unpin(entry.lease_id))
            self.tasks.append(task)
            task.add_done_callback(lambda t: self.tasks.remove(t) if t in self.tasks else None)

    async def unpin(self, lease_id: str) -> None:
        if not lease_id:
            return
        try:
            await self.views.unpin(lease_id)
        except Exception as err:  # noqa: BLE001 - the lease expires by itself; nothing is lost
            log.warning("unpin of lease %s failed: %s", lease_id, err)

    async def renew_forever(self) -> None:
        """Renews every held entry's lease a few times per TTL."""
        while True:
            await asyncio.sleep(max(self.ttl_s / 3, 0.05))
            for key in [h.key for h in self.slots.held()] + [a.key for a in self.slots.adapters()]:
                entry = self.slots.get(key)
                if entry is None or not entry.lease_id:
                    continue
                try:
                    await self.views.renew(entry.lease_id, self.ttl_s)
                except Exception as err:  # noqa: BLE001 - keep serving; the files stay open via the loaded weights
                    log.warning("renewing the lease of %s failed: %s", entry.key, err)
