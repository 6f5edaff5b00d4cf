"""Run commands inside the built image's root file system the way a container runtime would.

No container engine daemon runs here, and `podman run` fails on crun's rlimit set-up, so a
container is approximated with util-linux: `unshare` gives a mount and a PID namespace (and a
network namespace when asked), the image's root is bind-mounted read-only (the chart's
`readOnlyRootFilesystem: true`), /proc, a minimal /dev and a tmpfs /tmp (the injected emptyDir)
are mounted inside, and `chroot --userspec` drops to the image's configured user, whose
capabilities are then gone as in a Pod with `drop: [ALL]`. The environment is the image's `Env`
plus HOME from the image's /etc/passwd, as runc sets it. Everything lives in the namespaces and
vanishes with them; the unpacked root file system is removed by the fixture that made it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import meshlet

REPO = Path(__file__).parents[2]
sys.path.insert(0, str(REPO / "scripts" / "image"))
import ociarchive  # noqa: E402  (scripts/image is not a package: the build runs it before any venv)

DIST = REPO / "dist"
SIDECAR_ARCHIVE = DIST / f"meshlet-{meshlet.__version__}.oci.tar"
AGENT_ARCHIVE = DIST / f"meshlet-{meshlet.__version__}-agent.oci.tar"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

NEEDS_ROOT = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: unshare, mount and chroot into the image"),
    pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare (util-linux)"),
]


def read_image(archive: Path) -> ociarchive.Image:
    if not archive.exists():
        pytest.fail(f"{archive.relative_to(REPO)}: no such file; `make image-test` builds it before the tests")
    return ociarchive.read(archive)


def numeric_user(image: ociarchive.Image) -> tuple[int, int]:
    user, _, group = (image.config.get("User") or "0").partition(":")
    assert user.isdigit() and (group or user).isdigit(), f"{image.name}: User {image.config.get('User')!r} is not UID:GID"
    return int(user), int(group or user)


@dataclass(frozen=True)
class Rootfs:
    path: Path
    image: ociarchive.Image

    def user(self) -> tuple[int, int]:
        """The image's `User`, numeric: the kubelet can check `runAsNonRoot` only against a number."""
        return numeric_user(self.image)

    def passwd(self, user: str) -> list[str] | None:
        for line in (self.path / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if user in (fields[0], fields[2]):
                return fields
        return None

    def environment(self, uid: int) -> dict[str, str]:
        env = dict(item.partition("=")[::2] for item in self.image.config.get("Env", []))
        entry = self.passwd(str(uid))
        env.setdefault("HOME", entry[5] if entry else "/")
        return env

    def command(
        self, argv: Sequence[str], *, uid: int | None = None, binds: Mapping[str, Path] = {},
        rbinds: Mapping[str, Path] = {}, net: bool = False, caps: Sequence[str] | None = None,
        env: Mapping[str, str] = {},
    ) -> list[str]:
        """The host command running `argv` in the image, as `uid` (default: the image's user).

        `binds` maps a path in the image to a host path mounted there read-only (as a Pod's
        volumes); `rbinds` recursively and writable (the agent's /sys). `caps` (for root) limits
        the bounding set as a Pod's `capabilities: {drop: [ALL], add: caps}` does, through the
        image's own setpriv.
        """
        image_uid, image_gid = self.user()
        uid = image_uid if uid is None else uid
        gid = image_gid if uid == image_uid else uid
        root = shlex.quote(str(self.path))
        mounts = [
            f"mount --bind {root} {root}",
            f"mount -t proc -o nosuid,nodev,noexec proc {root}/proc",
            f"mount -t tmpfs -o nosuid,mode=0755 tmpfs {root}/dev",
            *(f"touch {root}/dev/{d} && mount --bind /dev/{d} {root}/dev/{d}" for d in DEVICES),
            f"mkdir {root}/dev/shm && mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs {root}/dev/shm",
            f"mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs {root}/tmp",
        ]
        for target, source, recursive in [*((t, s, False) for t, s in binds.items()),
                                          *((t, s, True) for t, s in rbinds.items())]:
            where = shlex.quote(f"{self.path}{target}")
            make = f"mkdir -p {where}" if source.is_dir() else f"mkdir -p $(dirname {where}) && touch {where}"
            mounts += [make, f"mount {'--rbind' if recursive else '--bind'} {shlex.quote(str(source))} {where}"]
            if not recursive:
                mounts.append(f"mount -o remount,bind,ro {where}")
        mounts.append(f"mount -o remount,bind,ro {root}")
        environment = [f"{k}={v}" for k, v in {**self.environment(uid), **env}.items()]
        inner = ["/usr/bin/env", "-i", *environment, *argv]
        if caps is not None:
            bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
            inner = ["/usr/bin/setpriv", f"--bounding-set={bounding}", "--", *inner]
        chroot = ["chroot", f"--userspec={uid}:{gid}", f"--groups={gid}", str(self.path), *inner]
        # sh stays PID 1 of the namespace (no exec): killing unshare kills it (--kill-child),
        # and with it every process of the namespace, whatever UID they dropped to.
        script = " && ".join(mounts) + " && " + shlex.join(chroot)
        return ["unshare", "--mount", "--pid", "--fork", "--kill-child", *(["--net"] if net else []),
                "sh", "-c", script]

    def run(self, argv: Sequence[str], *, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv, **kwargs), capture_output=True, text=True, timeout=timeout)

    @contextlib.contextmanager
    def start(self, argv: Sequence[str], *, ready: re.Pattern[str], timeout: float = 60, **kwargs) -> Iterator[Running]:
        """A server in the image, yielded once its stderr matches `ready`; stopped by SIGTERM on exit."""
        log = Path(tempfile.mkstemp(prefix="image-test-", suffix=".log")[1])
        with open(log, "wb") as err:
            process = subprocess.Popen(self.command(argv, **kwargs), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=err)
        running = Running(process, log)
        try:
            deadline = time.monotonic() + timeout
            while not (match := ready.search(log.read_text())):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{argv[0]} did not start (exit {process.poll()}):\n{log.read_text()}")
                time.sleep(0.1)
            running.match = match
            yield running
        finally:
            running.stop()
            log.unlink(missing_ok=True)


@dataclass
class Running:
    process: subprocess.Popen
    log: Path
    match: re.Match[str] | None = None

    def stderr(self) -> str:
        return self.log.read_text()

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM to what runs in the image (the children of the namespace's sh), then wait:
        the server's own shutdown runs (an agent removes its programs and pins)."""
        if self.process.poll() is None:
            shells = _children(self.process.pid)  # unshare's child: sh, PID 1 of the namespace
            for pid in (child for shell in shells for child in _children(shell)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


@contextlib.contextmanager
def unpacked(archive: Path) -> Iterator[Rootfs]:
    """The archive's image unpacked (its layers, in order) into a tmpfs of its own: quick to
    write, and gone with one umount whatever the test left in it."""
    read_image(archive)
    path = Path(tempfile.mkdtemp(prefix="image-test-rootfs-"))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,mode=0755", "image-test", str(path)], check=True)
        image = ociarchive.unpack(archive, path)
        yield Rootfs(path, image)
    finally:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True)
        path.rmdir()
