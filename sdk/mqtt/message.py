"""What a subscription handler is given, and a client's last will."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Message", "Will"]


@dataclass(frozen=True)
class Message:
    """A message as delivered to a subscription handler."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    #: The packet id (QoS 1/2), for :meth:`MqttClient.ack`.
    mid: int = 0
    #: Which connection (:attr:`MqttClient.connections`) delivered it.
    connection: int = 0


@dataclass(frozen=True)
class Will:
    """The last will: what the broker publishes for this client if it vanishes without a
    clean :meth:`MqttClient.close` (a device marks itself ``offline`` this way)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
