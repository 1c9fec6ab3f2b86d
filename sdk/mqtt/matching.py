"""MQTT topic filters: which topics a filter matches."""

from __future__ import annotations

import functools

__all__ = ["topic_matches"]


@functools.lru_cache(maxsize=65536)
def topic_matches(topic_filter: str, topic: str) -> bool:
    """True if ``topic`` matches ``topic_filter`` (``+`` and ``#`` wildcards, ``$share/g/``),
    by the rules of MQTT (a ``#`` also matches its parent level; a wildcard at the first level
    does not match a ``$`` topic). Cached: a fleet publishes on the same topics again and again.
    (paho's ``topic_matches_sub`` builds a matcher tree per call, about 100 µs: too slow for a
    dispatcher that asks for every new topic, such as every chunk of a bundle.)"""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    levels, names = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and levels[0] in ("+", "#"):
        return False
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level == "#":
            return index == last
        if index >= len(names) or (level != "+" and level != names[index]):
            return False
    return len(levels) == len(names)
