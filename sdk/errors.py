"""One exception hierarchy for all of edgekit.

Every error a user can cause derives from :class:`EdgekitError`. The CLI turns any of them
into one line on stderr and a non-zero exit code (see ``edgekit.cli``); library callers catch
the specific class they care about. Each message names the problem and, where there is one,
the fix.
"""

from __future__ import annotations

__all__ = [
    "AccuracyGateError",
    "AuthError",
    "BrokerError",
    "BundleError",
    "ConfigError",
    "DataError",
    "DeliveryError",
    "DesiredStateError",
    "DownloadCancelledError",
    "DownloadStalledError",
    "EdgekitError",
    "HealthCheckError",
    "InstallError",
    "KeyStoreError",
    "MessageError",
    "ModelFormatError",
    "PromotionRefusedError",
    "RolloutError",
    "RuntimeUnavailableError",
    "SignatureError",
    "TopicError",
    "TrustMetadataError",
    "UntrustedKeyError",
]


class EdgekitError(Exception):
    """Root of every error edgekit raises on purpose."""

    #: Process exit code the CLI uses for this class of error.
    exit_code: int = 1


class ConfigError(EdgekitError):
    """A configuration file, environment variable or flag is missing or invalid."""

    exit_code = 2


class KeyStoreError(EdgekitError):
    """A signing or public key is missing, unreadable, or would be overwritten."""

    exit_code = 3


class BundleError(EdgekitError):
    """A bundle file is malformed, oversized, or its contents do not match its manifest."""

    exit_code = 4


class SignatureError(BundleError):
    """A signature is missing, malformed, or does not verify."""

    exit_code = 5


class UntrustedKeyError(SignatureError):
    """A signature verifies under a key that is not among the trusted keys."""


class ModelFormatError(EdgekitError):
    """A model file is not a readable TFLite (or accepted source) model."""

    exit_code = 6


class DataError(EdgekitError):
    """Input data (.npy, .npz, image folder) is missing, unreadable, or of the wrong shape."""

    exit_code = 7


class RuntimeUnavailableError(EdgekitError):
    """No TFLite runtime could be imported, or the configured one is missing."""

    exit_code = 8


class DesiredStateError(EdgekitError):
    """A desired-state document is unsigned, untrusted, replayed, expired or for another fleet."""

    exit_code = 9
    #: Why, as a stable word for events and metrics: unsigned, untrusted, forged, malformed,
    #: other-fleet, other-device, expired, replayed (see ``edgekit.desired``).
    reason: str = "malformed"


class TrustMetadataError(EdgekitError):
    """TUF trust metadata (root, targets, desired, snapshot, timestamp) that must not be trusted."""

    exit_code = 17
    #: Why, as a stable word for events: refused (not enough valid signatures), rollback,
    #: expired, mismatch (not what the snapshot pins), malformed, unauthorised (a bundle or
    #: path the delegating role does not allow), incomplete (the pinned version has not
    #: arrived yet: wait), threshold (a workstation action lacks signatures).
    reason: str = "malformed"


class InstallError(EdgekitError):
    """A bundle could not be installed; the previously installed bundle keeps serving."""

    exit_code = 10


class HealthCheckError(InstallError):
    """A model's outputs on its bundled health-check inputs differ from what its author recorded."""

    exit_code = 11


class AccuracyGateError(EdgekitError):
    """A converted model lost more accuracy than ``--max-accuracy-drop`` allows; nothing was written."""

    exit_code = 20

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        #: The conversion report (``edgekit.converters.ConversionReport``) with every figure.
        self.report = report


class BrokerError(EdgekitError):
    """The MQTT broker is unreachable, refused a connection, or refused a message or subscription."""

    exit_code = 12


class DownloadStalledError(BrokerError):
    """A bundle download got nothing from the broker for longer than its inactivity timeout
    (the broker does not hold the chunks, or does not deliver them)."""


class DownloadCancelledError(EdgekitError):
    """A bundle download was cancelled before it completed: a newer desired state preempted it,
    or the agent is stopping. What it stored is kept (the next start resumes from it)."""


class TopicError(EdgekitError):
    """A topic, fleet id or device id does not fit edgekit's topic layout."""

    exit_code = 13


class MessageError(EdgekitError):
    """A message from a device (state, telemetry, event) is malformed or oversized.

    Receivers count and drop such messages; they never stop a loop."""

    exit_code = 14
    #: Why, as a stable word for metrics: oversized, not_json, wrong_schema, wrong_version,
    #: bad_field, device_mismatch (see ``edgekit.reports``).
    reason: str = "bad_field"


class AuthError(EdgekitError):
    """Not signed in to the fleet service, a session that expired, or a role that may not act."""

    exit_code = 16


class RolloutError(EdgekitError):
    """A rollout was aborted, or devices failed or did not answer in time."""

    exit_code = 15


class PromotionRefusedError(RolloutError):
    """``edgekit shadow promote`` refused: the candidate's figures failed on some devices.
    ``verdict`` is what ``--json`` prints (``passed``, ``reasons``: one per failing device)."""

    def __init__(self, message: str, verdict: dict[str, object]) -> None:
        super().__init__(message)
        self.verdict = verdict


class DeliveryError(EdgekitError):
    """An alert could not be sent through a channel (mail server or webhook refused or silent)."""

    exit_code = 17


class CaptureError(EdgekitError):
    """Field-data capture: a policy that cannot be made or is refused, a capture key that cannot
    be read, a captured record that cannot be opened. ``reason`` says which (e.g. ``unsigned``,
    ``expired``, ``wrong-key``, ``tampered``, ``truncated``)."""

    exit_code = 18
    reason: str = "malformed"
