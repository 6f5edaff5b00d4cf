"""`meshlet run --addon FILE`: users' mitmproxy addon scripts, loaded as `mitmproxy -s` loads them.

The script is read by mitmproxy's own loader (`mitmproxy.addons.script.load_script`), so it is
written against mitmproxy's addon API and nothing of meshlet's: its module, or the objects in
its `addons` list, receive every hook of every flow. Unlike `-s`, a script is loaded once at
start and not reloaded when the file changes: a sidecar runs what it started with, on every
worker alike.

mitmproxy does not raise a script's errors while loading it: it logs them (a traceback) and
carries on with half a module. A sidecar must instead refuse to start, so while scripts load
and configure, mitmproxy's error records, and the exceptions its `load` and `configure` hooks
raise, become one `StartupError` naming the file and line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
import types
from collections.abc import Iterator, Sequence

from mitmproxy import hooks
from mitmproxy.addons import script
from mitmproxy.master import Master

from meshlet.proxy.engine import StartupError


class _Caught(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def where(paths: Sequence[str], error: BaseException) -> str:
    """`FILE:LINE` of the innermost frame of a script in `error` (or the file a SyntaxError names)."""
    if isinstance(error, SyntaxError) and error.filename in paths:
        return f"{error.filename}:{error.lineno}"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename in paths]
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno}"
    return ", ".join(paths)


def describe(paths: Sequence[str], error: BaseException) -> str:
    lines = str(error).splitlines()
    return f"addon {where(paths, error)}: {type(error).__name__}" + (f": {lines[0]}" if lines else "")


def describe_record(paths: Sequence[str], record: logging.LogRecord) -> str:
    """One line from mitmproxy's log record of a script error."""
    if record.exc_info and record.exc_info[1] is not None:
        return describe(paths, record.exc_info[1])
    return f"addon {', '.join(paths)}: {record.getMessage().splitlines()[0]}"


@contextlib.contextmanager
def script_errors(paths: Sequence[str]) -> Iterator[None]:
    """Turn what mitmproxy logs (or raises) while the scripts load into one StartupError.

    The records are kept from the log: the one line says it all, and a worker's stderr is the
    supervisor's. Without scripts, nothing is touched."""
    if not paths:
        yield
        return
    caught = _Caught()
    mitmproxy_log = logging.getLogger("mitmproxy")
    propagate = mitmproxy_log.propagate
    mitmproxy_log.addHandler(caught)
    mitmproxy_log.propagate = False
    try:
        yield
    except StartupError:
        raise
    except Exception as e:  # a script's `load` or `configure` hook, or mitmproxy refusing the script
        raise StartupError(describe(paths, e)) from None
    finally:
        mitmproxy_log.removeHandler(caught)
        mitmproxy_log.propagate = propagate
    if caught.records:
        raise StartupError(describe_record(paths, caught.records[0]))


def load_scripts(paths: Sequence[str]) -> list[types.ModuleType]:
    """The scripts' modules, to add to the addon chain (inside `script_errors`)."""
    modules = []
    for path in paths:
        if not os.path.isfile(path):
            raise StartupError(f"addon {path}: no such file")
        module = script.load_script(path)
        if module is not None:
            modules.append(module)
    return modules


def configure(master: Master, modules: Sequence[types.ModuleType]) -> None:
    """What mitmproxy's script loader does once a script is in the chain: `configure` with every option."""
    for module in modules:
        master.addons.invoke_addon_sync(module, hooks.ConfigureHook(set(master.options.keys())))
