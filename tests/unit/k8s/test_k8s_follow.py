"""Where `--watch-kube` sends the sets it watched: this sidecar's own admin API."""

from __future__ import annotations

import pytest

from meshlet.k8s.follow import admin_url


@pytest.mark.parametrize(("ready", "url"), [
    ("127.0.0.1:15000", "http://127.0.0.1:15000"),
    ("0.0.0.0:15000", "http://127.0.0.1:15000"),  # the injected sidecar listens on every address
    ("[::]:15000", "http://127.0.0.1:15000"),
    ("[::1]:15000", "http://[::1]:15000"),
])
def test_admin_url_reaches_the_listener_from_this_host(ready, url):
    assert admin_url(ready) == url
