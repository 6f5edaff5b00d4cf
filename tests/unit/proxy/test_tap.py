"""Tap without sockets: the hub and its bounded feeds, the JSON lines, what the mitmproxy engine
publishes (and does not build while nobody listens), and records saved as mitmproxy flows."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from mitmproxy import io as mitmio
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tutils
from test_proxy_addon import flow, routing

from meshlet.proxy.config import SidecarConfig, config_from_json, config_to_json
from meshlet.proxy.mitm import routing as routing_module
from meshlet.proxy.mitm.flowfile import NO_RESPONSE, FlowFile
from meshlet.proxy.tap import Feed, Lost, TapHub, TapRecord, decode, encode, hub_lines

RECORD = TapRecord(1_700_000_000.25, "outbound", "GET", "reviews", "/a?b=1", "canary", "v2", 200, 0.0042,
                   "", "req-1")


def take(feed: Feed) -> list:
    return asyncio.run(feed.take())


class TestFeed:
    def test_a_slow_reader_loses_the_newest_and_is_told_where(self):
        feed: Feed[int] = Feed(3)
        for i in range(5):
            feed.offer(i)
        assert feed.lost_total == 2
        feed.offer(5)  # still full: lost too
        assert take(feed) == [0, 1, 2, Lost(3)]
        feed.offer(6)
        feed.offer(7)
        assert take(feed) == [6, 7]

    def test_never_holds_more_than_its_size(self):
        feed: Feed[int] = Feed(4)
        for i in range(1000):
            feed.offer(i)
            if i % 7 == 0:
                taken = take(feed)
                assert len([item for item in taken if not isinstance(item, Lost)]) <= 4
        assert feed.lost_total > 0

    def test_close_ends_after_what_is_queued(self):
        feed: Feed[int] = Feed()
        feed.offer(1)
        feed.close()
        assert take(feed) == [1]
        assert take(feed) == []


class TestHub:
    def test_active_only_while_someone_listens(self):
        hub = TapHub()
        assert hub.active is False
        hub.publish(RECORD)  # nobody: dropped on the floor
        with hub.subscribe() as first:
            assert hub.active is True
            with hub.subscribe() as second:
                hub.publish(RECORD)
            assert hub.active is True
            hub.publish(RECORD)
        assert hub.active is False
        assert take(first) == [RECORD, RECORD] and take(second) == [RECORD]

    def test_stream_subscribes_on_first_read_and_leaves_when_closed(self):
        async def scenario() -> list[bytes]:
            hub = TapHub()
            lines = hub_lines(hub)
            assert hub.active is False
            reading = asyncio.ensure_future(lines.__anext__())
            await asyncio.sleep(0)
            assert hub.active is True
            hub.publish(RECORD)
            first = await reading
            await lines.aclose()
            assert hub.active is False
            return [first]

        assert asyncio.run(scenario()) == [encode(RECORD)]

    def test_close_ends_every_stream(self):
        async def scenario() -> list[bytes]:
            hub = TapHub()
            lines = hub_lines(hub)
            reading = asyncio.ensure_future(lines.__anext__())
            await asyncio.sleep(0)
            hub.publish(RECORD)
            hub.close()
            got = [await reading]
            got += [line async for line in lines]
            assert hub.active is False
            return got

        assert asyncio.run(scenario()) == [encode(RECORD)]


class TestLines:
    def test_records_and_notices_round_trip(self):
        assert decode(encode(RECORD)) == RECORD
        assert decode(encode(Lost(7))) == Lost(7)
        assert json.loads(encode(RECORD))["request_id"] == "req-1"

    def test_fields_a_newer_sidecar_adds_are_skipped(self):
        value = json.loads(encode(RECORD)) | {"worker": 3}
        assert decode(json.dumps(value)) == RECORD

    @pytest.mark.parametrize("line", [b"[1]", b"{}", b"not json"])
    def test_anything_else_is_a_value_error(self, line):
        with pytest.raises(ValueError):
            decode(line)


class TestMitmEnginePublishes:
    def test_nothing_is_built_while_nobody_listens(self, monkeypatch):
        built: list[TapRecord] = []
        real = routing_module.tap_record
        monkeypatch.setattr(routing_module, "tap_record", lambda *args: built.append(real(*args)) or built[-1])
        hub = TapHub()
        addon = routing()
        addon.tap = hub
        for _ in range(3):
            f = flow(x_group="beta")
            asyncio.run(addon.requestheaders(f))
            f.response = tutils.tresp()
            addon.response(f)
        assert hub.active is False and built == []
        with hub.subscribe() as feed:
            f = flow(x_group="beta", x_request_id="abc")
            asyncio.run(addon.requestheaders(f))
            f.response = tutils.tresp()
            addon.response(f)
        assert len(built) == 1
        [record] = take(feed)
        assert (record.direction, record.method, record.authority, record.path) == ("outbound", "GET", "reviews", "/")
        assert (record.route, record.backend, record.status, record.request_id) == ("beta", "v2", 200, "abc")
        assert record.peer_identity == "" and 0 <= record.seconds < 5

    def test_inbound_records_carry_the_verified_peer_identity(self):
        hub = TapHub()
        addon = routing()
        addon.tap = hub
        addon.peer_identity = lambda client: "spiffe://cluster.local/ns/default/sa/frontend"
        f = flow(host="app", path="/in")
        f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:8080@15006")
        with hub.subscribe() as feed:
            asyncio.run(addon.requestheaders(f))
            f.response = tutils.tresp(status_code=201)
            addon.response(f)
        [record] = take(feed)
        assert (record.direction, record.route, record.backend, record.status) == ("inbound", "inbound", "app", 201)
        assert record.peer_identity == "spiffe://cluster.local/ns/default/sa/frontend"

    def test_with_user_addons_messages_are_not_streamed(self):
        addon, f = routing(), flow(x_group="beta")
        addon.stream = False
        asyncio.run(addon.requestheaders(f))
        f.response = tutils.tresp()
        addon.responseheaders(f)
        assert (f.request.host, f.request.port) == ("127.0.0.1", 9082)
        assert not f.request.stream and not f.response.stream


def test_saved_records_read_back_as_mitmproxy_flows():
    lost = TapRecord(RECORD.start, "inbound", "POST", "[::1]:8080", "/up", "inbound", "app", 0, 1.5,
                     "spiffe://cluster.local/ns/default/sa/frontend")
    buffer = io.BytesIO()
    saved = FlowFile(buffer)
    saved.add(RECORD)
    saved.add(lost)
    buffer.seek(0)
    first, second = list(mitmio.FlowReader(buffer).stream())
    assert first.request.pretty_url == "http://reviews/a?b=1" and first.request.headers["x-request-id"] == "req-1"
    assert first.response.status_code == 200 and first.response.reason == "OK"
    assert first.response.timestamp_end - first.request.timestamp_start == pytest.approx(0.0042, abs=1e-5)
    assert first.metadata["meshlet"]["route"] == "canary" and "backend=v2" in first.comment
    assert (second.request.host, second.request.port, second.request.method) == ("::1", 8080, "POST")
    assert second.response is None and second.error.msg == NO_RESPONSE
    assert second.metadata["meshlet"]["peer_identity"].endswith("/sa/frontend")


def test_config_carries_the_addons_to_workers_through_json():
    config = SidecarConfig(engine="mitmproxy", addons=("/srv/a.py", "/srv/b.py"))
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config
