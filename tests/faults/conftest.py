"""Fault tests: real agent processes, a real Mosquitto, real file systems; the device fixtures
(models, signed bundles, configs) are the agent tests' own (tests/device_fixtures.py)."""

from device_fixtures import Bundles, Models, bundles, config_path, key, make_config, models, other_key

__all__ = ["Bundles", "Models", "bundles", "config_path", "key", "make_config", "models", "other_key"]
