"""The MQTT client wrapper against a real Mosquitto: delivery, threading, reconnects, wills."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from edgekit.errors import BrokerError
from edgekit.mqtt import MqttClient, Will, parse_broker_url, topic_matches
from mqtt_helpers import Events, Inbox, Mqtt5Gate


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_published_message_reaches_subscriber_on_the_dispatcher_thread(mosquitto, protocol: str) -> None:
    inbox = Inbox()
    with (
        MqttClient(mosquitto.url, protocol=protocol, client_id=f"sub-{protocol}") as sub,
        MqttClient(mosquitto.url, protocol=protocol) as pub,
    ):
        sub.subscribe("t/+/x", inbox, qos=1)
        pub.publish("t/a/x", b"hello", qos=1).wait(5)
        pub.publish("t/a/y", b"not for us", qos=1).wait(5)
        pub.publish("t/b/x", "second", qos=0).wait(5)
        got = inbox.wait_for(lambda ms: len(ms) == 2)
    assert [(m.topic, m.payload) for m in got] == [("t/a/x", b"hello"), ("t/b/x", b"second")]
    assert inbox.threads == {f"edgekit-mqtt-sub-{protocol}"}


def test_retained_message_reaches_late_subscriber_and_empty_payload_clears_it(mosquitto) -> None:
    with MqttClient(mosquitto.url) as pub:
        pub.publish("r/one", b"kept", retain=True).wait(5)
    first = Inbox()
    with MqttClient(mosquitto.url) as late:
        late.subscribe("r/#", first)
        assert first.wait_topic("r/one").retain
        with MqttClient(mosquitto.url) as pub:
            pub.publish("r/one", b"", retain=True).wait(5)
            pub.publish("r/marker", b"m", retain=True).wait(5)
    second = Inbox()
    with MqttClient(mosquitto.url) as later:
        later.subscribe("r/#", second)
        second.wait_topic("r/marker")
    assert second.topics() == ["r/marker"]


def test_handler_exception_is_counted_and_delivery_goes_on(mosquitto) -> None:
    inbox = Inbox()

    def broken(_message: object) -> None:
        raise ValueError("bug in a handler")

    with MqttClient(mosquitto.url) as client:
        client.subscribe("h/#", broken)
        client.subscribe("h/#", inbox)
        client.publish("h/1", b"a").wait(5)
        client.publish("h/2", b"b").wait(5)
        inbox.wait_for(lambda ms: len(ms) == 2)
        assert client.handler_errors == 2


def test_handler_may_publish_and_wait_from_the_dispatcher_thread(mosquitto) -> None:
    replies = Inbox()
    with MqttClient(mosquitto.url) as client:

        def echo(message: object) -> None:
            client.publish("echo/out", b"pong", qos=1).wait(5)

        client.subscribe("echo/in", echo)
        client.subscribe("echo/out", replies)
        client.publish("echo/in", b"ping").wait(5)
        assert replies.wait_topic("echo/out").payload == b"pong"


def test_client_reconnects_and_resubscribes_after_broker_restart(mosquitto) -> None:
    inbox, events = Inbox(), Events()
    sub = MqttClient(mosquitto.url, reconnect_min=0.1, reconnect_max=0.5)
    sub.on_connection_change(events)
    pub = MqttClient(mosquitto.url, reconnect_min=0.1, reconnect_max=0.5)
    with sub.connect(), pub.connect():
        sub.subscribe("re/#", inbox)
        pub.publish("re/before", b"1").wait(5)
        inbox.wait_topic("re/before")

        mosquitto.stop()
        events.wait_count(False, 1)
        assert not sub.connected
        # QoS 1 while the broker is down: paho keeps it and sends it after the reconnect. It is
        # retained because the subscriber's clean session may come back after it was routed;
        # the renewed subscription then gets it from the broker's retained copy.
        during = pub.publish("re/during", b"2", qos=1, retain=True)
        mosquitto.start()
        events.wait_count(True, 2)
        during.wait(20)
        pub.publish("re/after", b"3", qos=1).wait(20)
        inbox.wait_for(lambda ms: {"re/during", "re/after"} <= {m.topic for m in ms}, timeout=20)
        assert sub.connections >= 2


def test_every_connection_sends_small_packets_at_once(mosquitto) -> None:
    """Nagle's algorithm is off on the client's socket, also on the one of a reconnect: a
    SUBSCRIBE right after a PUBLISH would otherwise wait for the broker's delayed ACK."""
    events = Events()
    client = MqttClient(mosquitto.url, reconnect_min=0.1, reconnect_max=0.5)
    client.on_connection_change(events)

    def nodelay() -> int:
        sock = client._paho.socket()
        assert sock is not None
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    with client.connect():
        assert nodelay() == 1
        mosquitto.stop()
        events.wait_count(False, 1)
        mosquitto.start()
        events.wait_count(True, 2)
        assert nodelay() == 1


def test_qos0_message_while_disconnected_is_reported_dropped(mosquitto) -> None:
    events = Events()
    client = MqttClient(mosquitto.url, reconnect_min=5, reconnect_max=10)
    client.on_connection_change(events)
    with client.connect():
        mosquitto.stop()
        events.wait_count(False, 1)
        with pytest.raises(BrokerError, match="dropped"):
            client.publish("q0", b"x", qos=0).wait(1)


def test_unreachable_broker_is_a_broker_error(mosquitto) -> None:
    mosquitto.stop()
    with pytest.raises(BrokerError, match="could not connect"):
        MqttClient(mosquitto.url).connect(timeout=1.0)


@pytest.mark.parametrize(
    "url",
    [
        "http://host:1",
        "mqtt://",
        "mqtt://host:notaport",
        "mqtt://host/path",
        "mqtt://host:99999",
        "mqtt://host?protocol=4",
        "mqtt://host?qos=1",
        "mqtt://host?protocol=5&protocol=3.1.1",
    ],
)
def test_malformed_broker_url_is_refused(url: str) -> None:
    with pytest.raises(BrokerError, match="invalid broker URL|path"):
        MqttClient(url)


def test_broker_url_parts() -> None:
    plain = parse_broker_url("mqtt://example.org")
    assert (plain.host, plain.port, plain.tls) == ("example.org", 1883, False)
    tls = parse_broker_url("mqtts://u%40x:p%3Aw@10.0.0.1")
    assert (tls.host, tls.port, tls.tls, tls.username, tls.password) == ("10.0.0.1", 8883, True, "u@x", "p:w")
    assert plain.protocol is None and parse_broker_url("mqtt://h:1?protocol=3.1.1").protocol == "3.1.1"


def test_the_protocol_version_comes_from_the_url_unless_given(mosquitto) -> None:
    assert MqttClient("mqtt://h:1?protocol=3.1.1").protocol == "3.1.1"
    assert MqttClient("mqtt://h:1").protocol == "5"
    assert MqttClient("mqtt://h:1?protocol=3.1.1", protocol="5").protocol == "5"
    with MqttClient(f"{mosquitto.url}?protocol=3.1.1") as client:
        client.publish("v311", b"x").wait(10)


def test_a_client_told_nothing_speaks_mqtt5_to_mosquitto_at_the_first_attempt(mosquitto) -> None:
    gate = Mqtt5Gate(mosquitto.port)
    try:
        with MqttClient(mosquitto.url) as direct:
            assert direct.protocol == "5" and direct.connections == 1
        # Through a gate that lets MQTT 5 through, as long as nobody asks for it... it is asked.
        with MqttClient(f"{gate.url}?protocol=3.1.1") as pinned:
            assert pinned.protocol == "3.1.1"
        assert (gate.refused, gate.forwarded) == (0, 1)
    finally:
        gate.close()


def test_a_broker_that_drops_mqtt5_connects_gets_3_1_1_and_the_client_remembers_it(mosquitto) -> None:
    gate = Mqtt5Gate(mosquitto.port)
    inbox, events = Inbox(), Events()
    try:
        client = MqttClient(gate.url, reconnect_min=0.05, reconnect_max=0.2)
        client.on_connection_change(events)
        with client.connect():
            assert client.protocol == "3.1.1" and (gate.refused, gate.forwarded) == (1, 1)
            client.subscribe("neg/#", inbox)
            client.publish("neg/a", b"over 3.1.1", qos=1).wait(10)
            assert inbox.wait_topic("neg/a").payload == b"over 3.1.1"
            gate.drop_connections()
            events.wait_count(True, 2)
            # The reconnect spoke 3.1.1 straight away: no second MQTT 5 attempt.
            assert (gate.refused, gate.forwarded) == (1, 2) and client.protocol == "3.1.1"
        # A client pinned to MQTT 5 is told, in one line, what to change.
        with pytest.raises(BrokerError, match=r"without accepting MQTT 5; leave the protocol out") as info:
            MqttClient(f"{gate.url}?protocol=5", reconnect_min=0.05, reconnect_max=0.1).connect(timeout=2)
        assert "\n" not in str(info.value)
    finally:
        gate.close()


def test_something_that_closes_every_connection_is_not_taken_for_an_mqtt_broker() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        stop = threading.Event()

        def close_all() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    server.accept()[0].close()

        threading.Thread(target=close_all, daemon=True).start()
        try:
            with pytest.raises(BrokerError, match="without accepting MQTT 5 or MQTT 3.1.1; is this"):
                MqttClient(f"mqtt://127.0.0.1:{port}", reconnect_min=0.05, reconnect_max=0.1).connect(
                    timeout=2
                )
        finally:
            stop.set()


def test_topic_matching_handles_wildcards_and_shared_subscriptions() -> None:
    assert topic_matches("a/+/c", "a/b/c")
    assert topic_matches("a/#", "a/b/c")
    assert not topic_matches("a/+", "a/b/c")
    assert topic_matches("$share/ingest/edgekit/devices/+/telemetry", "edgekit/devices/d1/telemetry")


def _will_process(url: str, client_code: str) -> subprocess.Popen[str]:
    code = textwrap.dedent(
        f"""
        import sys, threading
        from edgekit.mqtt import MqttClient, Will
        client = MqttClient({url!r}, client_id="will-dev", keepalive=5,
                            will=Will("w/dev/state", b"offline", qos=1, retain=True))
        client.connect()
        {client_code}
        print("ready", flush=True)
        threading.Event().wait()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_will_marks_a_killed_client_offline_but_not_a_clean_close(mosquitto) -> None:
    inbox = Inbox()
    with MqttClient(mosquitto.url) as watcher:
        watcher.subscribe("w/#", inbox)
        proc = _will_process(mosquitto.url, 'client.publish("w/dev/state", b"online", retain=True).wait(5)')
        inbox.wait_for(lambda ms: [m.payload for m in ms] == [b"online"])
        proc.kill()  # no DISCONNECT: the broker publishes the will
        proc.wait()
        inbox.wait_for(lambda ms: [m.payload for m in ms] == [b"online", b"offline"])

        clean = MqttClient(
            mosquitto.url, client_id="will-clean", will=Will("w/clean/state", b"offline")
        ).connect()
        clean.publish("w/clean/state", b"online", retain=True).wait(5)
        clean.close()
        with MqttClient(mosquitto.url) as marker:
            marker.publish("w/marker", b"end").wait(5)
        got = inbox.wait_for(lambda ms: any(m.topic == "w/marker" for m in ms))
    assert [(m.topic, m.payload) for m in got if m.topic == "w/clean/state"] == [("w/clean/state", b"online")]


def test_close_is_idempotent_and_stops_threads(mosquitto) -> None:
    before = {t.name for t in threading.enumerate()}
    client = MqttClient(mosquitto.url, client_id="closer").connect()
    assert "edgekit-mqtt-closer" in {t.name for t in threading.enumerate()}
    client.close()
    client.close()
    assert {t.name for t in threading.enumerate()} <= before
    with pytest.raises(BrokerError, match="not started"):
        client.publish("x", b"y")
    _ = Will  # public API used above
