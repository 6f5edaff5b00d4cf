"""Where a sidecar's workload identity comes from, chosen once for both engines.

`identity_source(config)` returns an `IdentitySource`: an identity dir followed on disk
(`--identity DIR`, with `--ca DIR` for local self-reissue) or the identity service
(`--identity-server URL --identity-token FILE --trust-bundle FILE`), or None without mTLS.
Engines see one interface: `current` (the `TlsContexts` new handshakes use, None until a
certificate is held), `poll()` (call about once a second on the engine's loop; True when new
contexts were swapped in, a changed trust bundle included), `start()`, `ready()`, `describe()`
(GET /certs) and `close()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from meshlet.mtls.contexts import TlsContexts
from meshlet.mtls.files import IdentityError, read_bundle, read_identity
from meshlet.mtls.reissue import Reissuer
from meshlet.mtls.remote import RemoteIdentity, check_url, read_token
from meshlet.mtls.rotation import IdentityWatcher

POLL_SECONDS = 1.0  # how often engines call poll()


class IdentityConfig(Protocol):
    """The identity settings of `meshlet.proxy.config.SidecarConfig` (read by name, so this
    package need not import the proxy's)."""

    identity_dir: Path | None
    ca_dir: Path | None
    identity_server: str | None
    identity_token: Path | None
    trust_bundle: Path | None


class IdentitySource(Protocol):
    current: TlsContexts | None

    async def start(self) -> None:
        """Begin (the first certificate request); IdentityError when refused for good."""
        ...

    def poll(self) -> bool: ...

    def ready(self) -> bool:
        """A certificate is held: until then, mesh TLS is refused and /readyz says 503."""
        ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


def identity_source(config: IdentityConfig, alpn_select=None) -> IdentitySource | None:
    """The source the config names; IdentityError when its files are unusable. `alpn_select`
    is the server contexts' ALPN callback (each engine negotiates its own protocols)."""
    if config.identity_server is not None:
        assert config.identity_token is not None and config.trust_bundle is not None
        return RemoteIdentity(config.identity_server, config.identity_token, config.trust_bundle, alpn_select)
    if config.identity_dir is not None:
        reissuer = Reissuer(config.identity_dir, config.ca_dir) if config.ca_dir is not None else None
        return IdentityWatcher(config.identity_dir, alpn_select, reissuer)
    return None


def check_identity_config(config: IdentityConfig) -> None:
    """What `meshlet run` checks once before any worker starts: one IdentityError (or ValueError
    for a flag combination) naming the problem."""
    remote = (config.identity_server, config.identity_token, config.trust_bundle)
    if any(v is not None for v in remote):
        if not all(v is not None for v in remote):
            raise ValueError("--identity-server, --identity-token and --trust-bundle go together: give all three")
        if config.identity_dir is not None or config.ca_dir is not None:
            raise ValueError("--identity-server replaces --identity and --ca: give one or the other")
        assert config.identity_server is not None and config.identity_token is not None
        assert config.trust_bundle is not None
        check_url(config.identity_server)
        read_token(config.identity_token)
        read_bundle(config.trust_bundle)
        return
    if config.ca_dir is not None and config.identity_dir is None:
        raise ValueError("--ca reissues the --identity certificate: give --identity DIR too")
    if config.identity_dir is not None:
        read_identity(config.identity_dir)
        if config.ca_dir is not None:
            Reissuer(config.identity_dir, config.ca_dir)


__all__ = ["IdentityConfig", "IdentityError", "IdentitySource", "check_identity_config", "identity_source"]
