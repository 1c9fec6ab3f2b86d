"""edgekit's own read side of the MQTT client (sdk/mqtt.py): packet framing, batched delivery
and acknowledgements, malformed input. Against a real Mosquitto, except where a broker would
have to misbehave (malformed packets, non-UTF-8 topics): Mosquitto never sends those, so a
scripted peer on a real socket plays the broker there."""

from __future__ import annotations

import socket
import struct
import threading
import uuid

import pytest
from edgekit.mqtt import MalformedPacketError, MqttClient, topic_matches
from edgekit.mqtt._paho import FAST_READ_MEMBERS, PAHO_MEMBERS
from edgekit.mqtt.framing import PacketReader, PacketTooLargeError
from hypothesis import given, settings
from hypothesis import strategies as st
from mqtt_helpers import Inbox, mqtt_packet


def _read_all(reader: PacketReader, pieces: list[bytes]) -> list[tuple[int, bytes]]:
    out = []
    for piece in pieces:
        buffer, packets = reader.feed(piece)
        out += [(header, buffer[start:end]) for header, start, end in packets]
    return out


bodies = st.one_of(st.binary(max_size=300), st.binary(min_size=16_380, max_size=16_400))


@settings(max_examples=200, deadline=None)
@given(
    packets=st.lists(st.tuples(st.integers(0x10, 0xFF), bodies), min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 40_000), max_size=30),
)
def test_the_packet_reader_returns_every_packet_whatever_the_reads_cut(packets, cuts) -> None:
    stream = b"".join(mqtt_packet(header, body) for header, body in packets)
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
    assert _read_all(PacketReader(), pieces) == packets


def test_the_packet_reader_refuses_a_packet_over_its_limit_from_the_fixed_header_alone() -> None:
    reader = PacketReader(max_packet_size=100)
    buffer, packets = reader.feed(mqtt_packet(0x30, b"x" * 98))  # 100 bytes in all: taken
    assert [bytes(buffer[start:end]) for _, start, end in packets] == [b"x" * 98]
    with pytest.raises(
        PacketTooLargeError, match="101-byte packet, over this client's max_packet_size of 100"
    ):
        reader.feed(b"\x30\x63")  # announces 99 more bytes: nothing of them was sent or kept
    with pytest.raises(PacketTooLargeError):
        PacketReader(max_packet_size=1 << 20).feed(b"\x30\xff\xff\xff\x7f")  # 256 MB announced


def test_the_packet_reader_refuses_a_remaining_length_over_four_bytes() -> None:
    with pytest.raises(MalformedPacketError, match="four bytes"):
        PacketReader().feed(b"\x30\xff\xff\xff\xff\x01")


@pytest.fixture(params=[False, True], ids=["paho-read-side", "edgekit-read-side"])
def fast_read(request: pytest.FixtureRequest) -> bool:
    """Devices read with paho's read side, ingest with edgekit's: both must behave the same."""
    return bool(request.param)


def test_big_and_small_messages_arrive_intact_and_in_order(mosquitto, fast_read) -> None:
    inbox = Inbox()
    payloads = [bytes([i % 256]) * size for i, size in enumerate([1, 300_000, 5, 131_072, 0, 70_000] * 3)]
    with MqttClient(mosquitto.url, fast_read=fast_read) as sub, MqttClient(mosquitto.url) as pub:
        sub.subscribe("big/+", inbox)
        for index, payload in enumerate(payloads):
            pub.publish(f"big/{index}", payload, qos=index % 2)
        got = inbox.wait_for(lambda ms: len(ms) == len(payloads))
    assert [m.payload for m in got] == payloads
    assert [m.topic for m in got] == [f"big/{i}" for i in range(len(payloads))]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_ack_many_acknowledges_and_what_was_not_acked_comes_back(mosquitto, protocol: str, fast_read) -> None:
    client_id = f"acker-{uuid.uuid4().hex[:6]}"

    def session() -> MqttClient:
        return MqttClient(
            mosquitto.url,
            client_id=client_id,
            protocol=protocol,
            manual_ack=True,
            session_expiry=600,
            fast_read=fast_read,
        )

    first, inbox = session(), Inbox()
    first.subscribe("acks/+", inbox)
    first.connect()
    with MqttClient(mosquitto.url) as pub:
        for index in range(10):
            pub.publish(f"acks/{index}", str(index).encode(), qos=1).wait(5)
    got = inbox.wait_for(lambda ms: len(ms) == 10)
    assert first.ack_many(got[:6]) == 6
    with MqttClient(mosquitto.url) as pub:  # the acks went out before this round trip came back
        pub.publish("acks/marker", b"m", qos=1).wait(5)
    inbox.wait_topic("acks/marker")
    first.close()

    again, redelivered = session(), Inbox()
    again.subscribe("acks/+", redelivered)
    again.connect()
    back = redelivered.wait_for(lambda ms: len(ms) >= 5)
    again.ack_many(back)
    again.close()
    assert sorted(m.payload for m in back) == [b"6", b"7", b"8", b"9", b"m"]


class ScriptedBroker:
    """A peer on a real socket that answers CONNECT and SUBSCRIBE like a broker (MQTT 3.1.1)
    and then sends whatever the test gives it: the faults Mosquitto never produces."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.received: list[bytes] = []  # every packet the client sent, in order
        self._cond = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self._cond:
                self.connections.append(conn)
                self._cond.notify_all()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = PacketReader()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self.received.append(b"EOF")
                    self._cond.notify_all()
                return
            buffer, packets = reader.feed(data)
            for header, start, end in packets:
                body = buffer[start:end]
                if header == 0x10:  # CONNECT
                    conn.sendall(b"\x20\x02\x00\x00")
                elif header == 0x82:  # SUBSCRIBE: grant QoS 1
                    conn.sendall(b"\x90\x03" + body[:2] + b"\x01")
                with self._cond:
                    self.received.append(bytes([header]) + body)
                    self._cond.notify_all()

    def wait(self, predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self), timeout), self.received

    def close(self) -> None:
        self.server.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def scripted():
    broker = ScriptedBroker()
    yield broker
    broker.close()


def _publish(topic: bytes, payload: bytes, mid: int) -> bytes:
    return mqtt_packet(0x32, struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid) + payload)


def test_a_malformed_packet_drops_the_connection_and_the_client_connects_again(scripted, fast_read) -> None:
    inbox = Inbox()
    url = f"mqtt://127.0.0.1:{scripted.port}?protocol=3.1.1"
    with MqttClient(url, reconnect_min=0.05, fast_read=fast_read) as client:
        client.subscribe("t/#", inbox)
        # A topic length running past the end of its packet.
        scripted.connections[0].sendall(mqtt_packet(0x32, b"\x00\x50t/x\x00\x01"))
        scripted.wait(lambda b: sum(p[:1] == b"\x82" for p in b.received) == 2)  # subscribed again
        scripted.connections[1].sendall(_publish(b"t/ok", b"fine", 7))
        assert inbox.wait_topic("t/ok").payload == b"fine"
    assert b"EOF" in scripted.received


def test_a_non_utf8_topic_is_counted_dropped_and_still_acknowledged(scripted, fast_read) -> None:
    inbox = Inbox()
    url = f"mqtt://127.0.0.1:{scripted.port}?protocol=3.1.1"
    with MqttClient(url, manual_ack=True, fast_read=fast_read) as client:
        client.subscribe("t/#", inbox)
        scripted.connections[0].sendall(_publish(b"t/\xff\xfe", b"x", 41) + _publish(b"t/ok", b"y", 42))
        assert inbox.wait_topic("t/ok").payload == b"y"
        # Nobody will ack the message that reached no handler: the client does, or it would hold
        # a slot of the broker's in-flight window for ever.
        scripted.wait(lambda b: b"\x40" + struct.pack("!H", 41) in b.received)
        assert client.unroutable == 1
        assert b"\x40" + struct.pack("!H", 42) not in scripted.received  # that one is the app's


_LEVELS = st.sampled_from(["a", "b", "", "$x", "+", "#"])


@settings(max_examples=500, deadline=None)
@given(
    filter_levels=st.lists(_LEVELS, min_size=1, max_size=4),
    topic_levels=st.lists(st.sampled_from(["a", "b", "", "$x"]), min_size=1, max_size=4),
)
def test_topic_matching_agrees_with_paho(filter_levels: list[str], topic_levels: list[str]) -> None:
    """edgekit matches topics itself (paho's matcher costs ~100 µs a call); the rules must be
    the same as paho's for every valid filter ('#' last only)."""
    from paho.mqtt.client import topic_matches_sub

    if "#" in filter_levels[:-1]:
        return  # not a valid filter
    topic_filter, topic = "/".join(filter_levels), "/".join(topic_levels)
    assert topic_matches(topic_filter, topic) == topic_matches_sub(topic_filter, topic)
    assert topic_matches(f"$share/g/{topic_filter}", topic) == topic_matches_sub(topic_filter, topic)


def test_every_private_member_of_paho_edgekit_uses_exists_in_the_installed_paho():
    """An upgrade of paho that renames one fails here, not on a fleet (pyproject pins the minor)."""
    from importlib.metadata import version

    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)  # has them all
    missing = [name for name in (*PAHO_MEMBERS, *FAST_READ_MEMBERS) if not hasattr(client, name)]
    assert not missing, f"paho-mqtt {version('paho-mqtt')} lacks {missing}"


def _once(function, error: Exception):  # type: ignore[no-untyped-def]
    """``function``, except that its first call raises ``error``."""
    calls = [0]

    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 1:
            raise error
        return function(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("failure", ["callback-raises", "network-loop-raises", "oversized-packet"])
def test_any_failure_while_reading_drops_the_connection_and_the_client_connects_again(
    scripted, fast_read, failure: str
) -> None:
    """The network thread never dies silently: whatever goes wrong while it reads, the
    connection is dropped, the failure counted (read_errors) and logged, and the client
    connects again, subscribes again and receives. An oversized packet is real bytes from the
    scripted broker; an exception out of a callback or out of paho's loop is a bug edgekit
    cannot cause on purpose, so it is injected by wrapping that function (a fake for that fault)."""
    inbox = Inbox()
    url = f"mqtt://127.0.0.1:{scripted.port}?protocol=3.1.1"
    with MqttClient(url, reconnect_min=0.05, fast_read=fast_read, max_packet_size=4096) as client:
        client.subscribe("t/#", inbox)
        first = scripted.connections[0]
        if failure == "callback-raises":
            client._paho.on_message = _once(client._on_message, RuntimeError("injected"))  # paho's read side
            client._deliver = _once(client._deliver, RuntimeError("injected"))  # type: ignore[method-assign]
            first.sendall(_publish(b"t/x", b"boom", 3))
        elif failure == "network-loop-raises":
            client._paho._loop = _once(client._paho._loop, RuntimeError("injected"))  # type: ignore[method-assign]
            client.publish("t/wake", b"", qos=0)  # wakes the loop
        else:
            # The fixed header of a 200 MB PUBLISH and nothing else: the client must drop the
            # connection on the header alone, not wait for (or buffer) the body.
            first.sendall(b"\x32\x80\x80\x80\x64")
        scripted.wait(lambda b: sum(p[:1] == b"\x82" for p in b.received) == 2)  # subscribed again
        scripted.connections[1].sendall(_publish(b"t/ok", b"fine", 7))
        assert inbox.wait_topic("t/ok").payload == b"fine"
        assert client.read_errors == 1 and client.connected
        thread = client._paho._thread
        assert thread is not None and thread.is_alive()
    assert b"EOF" in scripted.received
