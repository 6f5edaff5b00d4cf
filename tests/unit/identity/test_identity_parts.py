"""The identity service's and client's small parts: rate limit, CA rotation state, backoff, config."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "mtls"))
from mtls_support import NOW, authority

from meshlet.identity.ratelimit import RateLimiter, parse_rate
from meshlet.identity.server import serving_names
from meshlet.mtls.cadir import finish_rotation, read_ca_dir, rotate
from meshlet.mtls.files import IdentityError, certs_pem, write_authority
from meshlet.mtls.remote import BACKOFF_CAP, check_url, retry_delay
from meshlet.mtls.source import check_identity_config
from meshlet.proxy.config import SidecarConfig, config_from_json, config_to_json

MINUTE = dt.timedelta(minutes=1)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_limit_is_a_bucket_per_identity():
    clock = Clock()
    limiter = RateLimiter(3, 60, clock)
    assert [limiter.take("a") for _ in range(3)] == [None, None, None]
    assert limiter.take("a") == pytest.approx(20.0)  # one token per 20s
    assert limiter.take("b") is None  # another identity is not slowed
    clock.t += 20
    assert limiter.take("a") is None
    assert limiter.take("a") == pytest.approx(20.0)
    clock.t += 3600
    assert [limiter.take("a") for _ in range(4)][-1] is not None  # refills to the burst, no further


@pytest.mark.parametrize(("text", "rate"), [("120/m", (120, 60.0)), ("10/s", (10, 1.0)), ("600/5m", (600, 300.0))])
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["120", "0/m", "5/0m", "x/m", "5/d"])
def test_parse_rate_refuses(text):
    with pytest.raises(ValueError, match="expected COUNT/PERIOD"):
        parse_rate(text)


def test_rotation_adds_then_switches_then_finishes(tmp_path):
    write_authority(tmp_path, authority())
    state = read_ca_dir(tmp_path)
    assert state.bundle == (authority().cert,) and state.signer(NOW).cert == authority().cert
    rotated = rotate(tmp_path, NOW, 10 * MINUTE)
    assert rotated.next is not None and rotated.bundle == (authority().cert, rotated.next.cert)
    state = read_ca_dir(tmp_path)  # what every identity-service replica reads from the Secret
    assert state.bundle == rotated.bundle
    assert state.signer(NOW + 9 * MINUTE).cert == authority().cert  # grace: sidecars are still learning the new CA
    assert state.signer(NOW + 10 * MINUTE).cert == rotated.next.cert
    with pytest.raises(IdentityError, match="already under way"):
        rotate(tmp_path, NOW, MINUTE)
    with pytest.raises(IdentityError, match="signs only from"):
        finish_rotation(tmp_path, NOW + 5 * MINUTE)
    finished = finish_rotation(tmp_path, NOW + 11 * MINUTE)
    assert finished.current.cert == rotated.next.cert
    assert read_ca_dir(tmp_path).bundle == (rotated.next.cert,) == finished.bundle
    assert read_ca_dir(tmp_path).next is None
    with pytest.raises(IdentityError, match="no rotation under way"):
        finish_rotation(tmp_path, NOW + 12 * MINUTE)


def test_a_bundle_without_the_signing_ca_is_refused(tmp_path):
    write_authority(tmp_path, authority())
    (tmp_path / "bundle.pem").write_bytes(certs_pem(authority("other").cert))
    with pytest.raises(IdentityError, match=r"bundle\.pem: does not hold ca\.pem"):
        read_ca_dir(tmp_path)


def test_backoff_is_jittered_capped_and_shorter_than_the_certificate():
    assert retry_delay(1, None, lambda: 1.0) == 1.0
    assert retry_delay(3, None, lambda: 1.0) == 4.0
    assert retry_delay(30, None, lambda: 1.0) == BACKOFF_CAP
    assert retry_delay(30, None, lambda: 0.5) == BACKOFF_CAP / 2  # jitter: anywhere below the ceiling
    assert retry_delay(30, 8.0, lambda: 1.0) == 2.0  # 8s of certificate left: retry within a quarter of it
    assert retry_delay(30, 0.0, lambda: 0.0) > 0


def test_serving_names():
    assert serving_names("127.0.0.1", ["a.svc"]) == ["127.0.0.1", "a.svc"]
    assert serving_names("0.0.0.0", ["a", "a.ns", "a"]) == ["a", "a.ns"]
    with pytest.raises(ValueError, match="--san NAME"):
        serving_names("::", [])


def test_identity_settings_reach_the_workers_without_any_secret():
    config = SidecarConfig(identity_server="https://id:15012", identity_token=Path("/var/run/secrets/meshlet/token"),
                           trust_bundle=Path("/etc/meshlet/trust/ca.pem"))
    text = config_to_json(config)
    assert config_from_json(text) == config and config.has_identity
    assert set(map(type, text.values())) <= {str, int, float, bool, list, type(None)}
    assert not SidecarConfig().has_identity


@pytest.mark.parametrize(("fields", "message"), [
    ({"identity_server": "https://id:1"}, "go together"),
    ({"identity_server": "http://id:1", "identity_token": Path("t"), "trust_bundle": Path("b")}, "https://"),
    ({"identity_server": "https://id:1", "identity_token": Path("t"), "trust_bundle": Path("b"),
      "identity_dir": Path("d")}, "replaces --identity"),
    ({"ca_dir": Path("ca")}, "give --identity DIR too"),
])
def test_identity_flags_are_checked_together(fields, message):
    with pytest.raises(ValueError, match=message):
        check_identity_config(SidecarConfig(**fields))


def test_identity_server_url_must_be_https():
    assert check_url("https://meshlet-identity.meshlet-system.svc:15012")
    with pytest.raises(ValueError, match="https://"):
        check_url("meshlet-identity:15012")
