"""What a sidecar leaves out of mitmproxy's per-request path, in one place.

mitmproxy is built for interactive interception: every hook of every request walks the whole
addon chain (`getattr` on each addon, a `contextlib` guard per addon) and is then repeated as
an `update` hook for flow views that a sidecar does not have. Profiled under wrk, that
dispatch was ~20% of a request; `LeanAddons` looks each hook's handlers up once instead and
skips hooks nobody listens to. Errors in a handler are logged as mitmproxy's `safecall` does.

The other switch is the interpreter's: mitmproxy type-checks every field of every request and
response it builds, and asserts throughout its proxy core, only `if __debug__`. Whatever serves
requests runs optimized (`-O`, meshlet.proxy.optimize); the checks stay on in tests.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks

log = logging.getLogger("meshlet.proxy")


class LeanAddons(addonmanager.AddonManager):
    """An AddonManager whose lifecycle dispatch goes through a per-hook index of handlers."""

    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self._index: dict[str, tuple[Callable[..., Any], ...]] = {}

    def handlers(self, name: str) -> tuple[Callable[..., Any], ...]:
        """The chain's callables for hook `name`, in chain order (children after their parent)."""
        found = self._index.get(name)
        if found is None:
            methods = (getattr(addon, name, None) for addon in addonmanager.traverse(self.chain))
            found = self._index[name] = tuple(m for m in methods if callable(m))
        return found

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self._dispatch(event)
        message = event.args()[0]
        if isinstance(message, flow.Flow) and self.handlers(hooks.UpdateHook.name):
            await self._dispatch(hooks.UpdateHook([message]))

    async def _dispatch(self, event: hooks.Hook) -> None:
        for func in self.handlers(event.name):
            try:
                result = func(*event.args())
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:
                log.error("Addon error: %s", e, exc_info=True)

    # Any change to the chain (or to an addon's children, which `register` precedes) re-indexes.
    def register(self, addon: Any) -> Any:
        self._index.clear()
        return super().register(addon)

    def add(self, *addons: Any) -> None:
        super().add(*addons)
        self._index.clear()

    def remove(self, addon: Any) -> None:
        super().remove(addon)
        self._index.clear()

    def clear(self) -> None:
        super().clear()
        self._index.clear()

