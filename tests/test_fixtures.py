"""The test fixtures themselves: a broker of our own, never the system one on 1883."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt


def test_mosquitto_fixture_is_a_private_real_broker(mosquitto):
    assert mosquitto.port != 1883
    got = threading.Event()
    received: list[bytes] = []

    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    publisher.publish("edgekit/test/retained", b"hello", qos=1, retain=True).wait_for_publish(10)
    publisher.loop_stop()
    publisher.disconnect()

    def on_message(client, userdata, message):
        received.append(message.payload)
        got.set()

    # A late subscriber gets the retained message from the broker alone.
    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    subscriber.on_message = on_message
    subscriber.on_connect = lambda client, *args: client.subscribe("edgekit/test/#", qos=1)
    subscriber.connect(mosquitto.host, mosquitto.port)
    subscriber.loop_start()
    assert got.wait(10)
    subscriber.loop_stop()
    subscriber.disconnect()
    assert received == [b"hello"]

    # The broker can be killed and started again on the same port (fault tests need this).
    mosquitto.stop()
    mosquitto.start()
    assert mosquitto.process is not None and mosquitto.process.poll() is None
