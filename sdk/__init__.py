"""edgekit: take a trained model from a workstation to a fleet of small Linux devices.

The public surface of the sdk. Everything not listed in ``__all__`` is internal.
"""

from __future__ import annotations

from ._version import __version__
from .baseline import Baseline
from .bundle import Bundle, create_bundle, inspect_bundle, read_bundle
from .errors import (
    BundleError,
    CaptureError,
    ConfigError,
    DataError,
    DesiredStateError,
    EdgekitError,
    HealthCheckError,
    InstallError,
    KeyStoreError,
    ModelFormatError,
    RuntimeUnavailableError,
    SignatureError,
    TrustMetadataError,
    UntrustedKeyError,
)
from .keys import PublicKey, SigningKey
from .manifest import Manifest
from .tflite import ModelInfo, TensorSpec, inspect_tflite
from .trust import TrustedKeys

__all__ = [
    "Baseline",
    "Bundle",
    "BundleError",
    "CaptureError",
    "ConfigError",
    "DataError",
    "DesiredStateError",
    "EdgekitError",
    "HealthCheckError",
    "InstallError",
    "KeyStoreError",
    "Manifest",
    "ModelFormatError",
    "ModelInfo",
    "PublicKey",
    "RuntimeUnavailableError",
    "SignatureError",
    "SigningKey",
    "TensorSpec",
    "TrustMetadataError",
    "TrustedKeys",
    "UntrustedKeyError",
    "__version__",
    "create_bundle",
    "inspect_bundle",
    "inspect_tflite",
    "read_bundle",
]
