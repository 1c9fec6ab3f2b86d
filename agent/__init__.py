"""The edgekit device agent. Imports the sdk only: never TensorFlow, converters or fleet.

``Agent`` serves the installed bundle (``predict``), reports drift and status, and queues
telemetry and events on disk; ``AgentConfig`` is its configuration; ``BundleStore`` the
crash-safe install pipeline it uses. See docs/agent.md.
"""

from __future__ import annotations

from edgekit.agent_config import AgentConfig

from .agent import Agent, AgentStatus
from .capture import Capturer
from .drift import DriftMonitor, DriftReport, FeatureDrift
from .install import BundleStore, InstallResult, LoadedBundle
from .outbox import Outbox
from .telemetry import Event, TelemetryRecord

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentStatus",
    "BundleStore",
    "Capturer",
    "DriftMonitor",
    "DriftReport",
    "Event",
    "FeatureDrift",
    "InstallResult",
    "LoadedBundle",
    "Outbox",
    "TelemetryRecord",
]
