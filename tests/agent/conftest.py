"""The agent's fixtures live in tests/device_fixtures.py, shared with tests/faults."""

from device_fixtures import (
    Bundles,
    Models,
    QatModel,
    bundles,
    config_path,
    device,
    key,
    make_config,
    mobilenet_model,
    models,
    other_key,
    qat_model,
)

__all__ = [
    "Bundles",
    "Models",
    "QatModel",
    "bundles",
    "config_path",
    "device",
    "key",
    "make_config",
    "mobilenet_model",
    "models",
    "other_key",
    "qat_model",
]
