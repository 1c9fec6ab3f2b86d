"""The agent's configuration: one frozen dataclass, loaded from TOML, then env, then keywords.

It lives in the core, not in ``edgekit.agent``: the workstation writes it (``edgekit device
add`` validates what it writes with this same class) and the device reads it.

A device's ``agent.toml`` (written by ``edgekit device add``) looks like::

    device = "pi-01"
    fleet = "cameras"
    state_dir = "/var/lib/edgekit"       # relative paths are relative to this file
    broker = "mqtt://broker.local:1883"  # used by the MQTT side (a later component)
    runtime = "auto"                     # auto | ai_edge_litert | tflite_runtime | tensorflow
    threads = 4                          # interpreter threads; 0 = one per CPU core
    xnnpack = true                       # false: the runtime's built-in kernels (see docs/agent.md)
    low_memory_install = true            # free the old model before loading the new (docs/agent.md)
    max_bundle_size = 268435456
    trust_root = "root.json"             # the fleet's TUF root: follow TUF metadata (docs/security.md)
    trusted_keys = '''
    -----BEGIN PUBLIC KEY-----
    ...
    -----END PUBLIC KEY-----
    '''

    [drift]
    sample_rate = 0.05   # fraction of predict() inputs summarised for drift
    window = 200         # sampled inputs per drift window
    psi_threshold = 0.1
    ks_threshold = 0.1

    [telemetry]
    interval = 60        # seconds per telemetry window
    queue_max = 10000    # records kept on disk while offline; the oldest are dropped

    [mqtt]               # written by `edgekit device add`
    username = "pi-01"
    password = "..."
    ca = "ca.pem"        # TLS (mqtts://): the CA of the broker's certificate
    cert = "pi-01.crt"   # TLS: this device's client certificate and key
    key = "pi-01.key"
    topic_prefix = "edgekit"

    [serve]              # local inference over HTTP (agent/serve.py); off unless set
    listen = "127.0.0.1:8500"
    token = ""           # required to listen beyond this machine

Every key can be overridden by an environment variable ``EDGEKIT_<KEY>`` (section keys as
``EDGEKIT_<SECTION>_<KEY>``, e.g. ``EDGEKIT_DRIFT_SAMPLE_RATE``), and then by keyword arguments
to :meth:`AgentConfig.load` named like the dataclass fields (``drift_sample_rate=0.1``).
Every error names the key and where its value came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from .bundle import MAX_BUNDLE_SIZE
from .config import load_toml
from .errors import ConfigError, EdgekitError
from .runtime import RUNTIMES
from .schema import ID
from .trust import TrustedKeys

__all__ = ["ENV_PREFIX", "AgentConfig", "config_keys", "parse_listen"]

ENV_PREFIX = "EDGEKIT_"

#: TOML location (section, key) of every field that does not sit at the top level.
_SECTIONS: dict[str, tuple[str, str]] = {
    "drift_sample_rate": ("drift", "sample_rate"),
    "drift_window": ("drift", "window"),
    "drift_psi_threshold": ("drift", "psi_threshold"),
    "drift_ks_threshold": ("drift", "ks_threshold"),
    "telemetry_interval": ("telemetry", "interval"),
    "telemetry_queue_max": ("telemetry", "queue_max"),
    "mqtt_username": ("mqtt", "username"),
    "mqtt_password": ("mqtt", "password"),
    "mqtt_ca": ("mqtt", "ca"),
    "mqtt_cert": ("mqtt", "cert"),
    "mqtt_key": ("mqtt", "key"),
    "topic_prefix": ("mqtt", "topic_prefix"),
    "serve_listen": ("serve", "listen"),
    "serve_token": ("serve", "token"),
}


@dataclass(frozen=True)
class AgentConfig:
    """Everything a device agent needs to know. Build it with :meth:`load` (validated)."""

    device: str
    fleet: str
    state_dir: Path
    trusted_keys: str  # PEM text: one or more ``BEGIN PUBLIC KEY`` blocks
    runtime: str = "auto"
    threads: int = 0  # 0: one interpreter thread per CPU core
    xnnpack: bool = True  # False: built-in kernels, no packed copy of the weights
    low_memory_install: bool = True  # False: the old model answers while the new one loads
    max_bundle_size: int = 256 * 1024 * 1024
    broker: str = ""
    #: Seconds without a chunk from the broker (while connected) before a download is reported stalled.
    download_stall_timeout: float = 120.0
    drift_sample_rate: float = 0.05
    drift_window: int = 200
    drift_psi_threshold: float = 0.1
    drift_ks_threshold: float = 0.1
    telemetry_interval: float = 60.0
    telemetry_queue_max: int = 10000
    mqtt_username: str = ""
    mqtt_password: str = field(default="", repr=False)
    mqtt_ca: Optional[Path] = None  # TLS: CA that signed the broker's certificate
    mqtt_cert: Optional[Path] = None  # TLS: this device's client certificate and key
    mqtt_key: Optional[Path] = None
    topic_prefix: str = "edgekit"
    serve_listen: str = ""  # HOST:PORT of the local inference server; "" = none
    serve_token: str = field(default="", repr=False)
    #: The fleet's initial TUF root (``edgekit trust export-root``). Set: the device follows the
    #: fleet's TUF metadata (edgekit.roles), and desired states signed by a single key are refused.
    trust_root: Optional[Path] = None
    source: str = "<keywords>"  # where the config came from, for messages

    @property
    def interpreter_threads(self) -> int:
        return self.threads if self.threads > 0 else (os.cpu_count() or 1)

    def trusted(self) -> TrustedKeys:
        """The trusted public keys, parsed; a ConfigError names the file if they are unusable."""
        try:
            return TrustedKeys.from_pem(self.trusted_keys.encode())
        except EdgekitError as exc:
            raise ConfigError(f"{self.source}: trusted_keys: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> AgentConfig:
        """Read ``path`` (TOML), apply ``EDGEKIT_*`` environment variables, then ``overrides``."""
        values: dict[str, tuple[Any, str]] = {}
        base = Path.cwd()
        source = "<keywords>"
        if path is not None:
            file = Path(path)
            source = str(file)
            base = file.resolve().parent
            values.update(_from_toml(load_toml(file), source))
        for name in config_keys():
            env = ENV_PREFIX + name.upper()
            if env in os.environ:
                values[name] = (os.environ[env], f"environment variable {env}")
        for name, value in overrides.items():
            if name not in config_keys():
                raise ConfigError(
                    f"unknown agent config key {name!r}; known keys: {', '.join(config_keys())}"
                )
            if value is not None:
                values[name] = (value, f"keyword {name}")
        return _build(values, base, source)


def config_keys() -> list[str]:
    """The field names of :class:`AgentConfig` a file, env variable or keyword may set."""
    return [f.name for f in fields(AgentConfig) if f.name != "source"]


def _from_toml(doc: Mapping[str, Any], source: str) -> dict[str, tuple[Any, str]]:
    known_top = {name for name in config_keys() if name not in _SECTIONS}
    sections: dict[str, dict[str, str]] = {}
    for name, (section, key) in _SECTIONS.items():
        sections.setdefault(section, {})[key] = name
    values: dict[str, tuple[Any, str]] = {}
    for key, value in doc.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            for sub, sub_value in value.items():
                if sub not in sections[key]:
                    raise ConfigError(
                        f"{source}: unknown key {key}.{sub}; known: {', '.join(sorted(sections[key]))}"
                    )
                values[sections[key][sub]] = (sub_value, f"{source}: {key}.{sub}")
        elif key in known_top:
            values[key] = (value, f"{source}: {key}")
        else:
            raise ConfigError(
                f"{source}: unknown key {key!r}; known: {', '.join(sorted(known_top | set(sections)))}"
            )
    return values


def _as_int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be an integer, not {value!r}") from None
    if isinstance(value, float) and value != number:
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    if number < minimum:
        raise ConfigError(f"{where} must be at least {minimum}, not {number}")
    return number


def _as_float(value: Any, where: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, not {value!r}") from None
    if not (low < number if low_open else low <= number) or number > high:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{where} must be in {bracket}{low}, {high}], not {number}")
    return number


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None  # from an environment variable
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{where} must be true or false, not {value!r}")


def _as_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    return value


def _build(values: dict[str, tuple[Any, str]], base: Path, source: str) -> AgentConfig:
    for required in ("device", "fleet", "state_dir", "trusted_keys"):
        if required not in values:
            raise ConfigError(
                f"{source}: missing required key {required!r} "
                f"(set it in the file or with {ENV_PREFIX}{required.upper()}); "
                "`edgekit device add` writes a complete config"
            )
    checks: dict[str, Callable[[Any, str], Any]] = {
        "device": lambda v, w: _ident(_as_str(v, w), w),
        "fleet": lambda v, w: _ident(_as_str(v, w), w),
        "state_dir": lambda v, w: _path(v, w, base),
        "trusted_keys": _as_str,
        "runtime": _runtime,
        "threads": lambda v, w: _as_int(v, w, 0),
        "xnnpack": _as_bool,
        "low_memory_install": _as_bool,
        "max_bundle_size": lambda v, w: _max_size(_as_int(v, w, 1024), w),
        "broker": _as_str,
        "download_stall_timeout": lambda v, w: _as_float(v, w, 0.0, 86400.0, low_open=True),
        "drift_sample_rate": lambda v, w: _as_float(v, w, 0.0, 1.0),
        "drift_window": lambda v, w: _as_int(v, w, 10),
        "drift_psi_threshold": lambda v, w: _as_float(v, w, 0.0, 100.0, low_open=True),
        "drift_ks_threshold": lambda v, w: _as_float(v, w, 0.0, 1.0, low_open=True),
        "telemetry_interval": lambda v, w: _as_float(v, w, 0.0, 86400.0, low_open=True),
        "telemetry_queue_max": lambda v, w: _as_int(v, w, 1),
        "mqtt_username": _as_str,
        "mqtt_password": _as_str,
        "mqtt_ca": lambda v, w: _path(v, w, base),
        "mqtt_cert": lambda v, w: _path(v, w, base),
        "mqtt_key": lambda v, w: _path(v, w, base),
        "topic_prefix": _topic_prefix,
        "serve_listen": lambda v, w: _listen(_as_str(v, w), w),
        "serve_token": _as_str,
        "trust_root": lambda v, w: _path(v, w, base),
    }
    kwargs = {name: checks[name](value, where) for name, (value, where) in values.items()}
    config = AgentConfig(source=source, **kwargs)
    config.trusted()  # validate the keys now, naming the file
    return config


def parse_listen(value: str, where: str = "serve.listen") -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); a ConfigError names ``where``."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where} must be HOST:PORT such as 127.0.0.1:8500, not {value!r}")
    return host, int(port_text)


def _listen(value: str, where: str) -> str:
    if value:
        parse_listen(value, where)
    return value


def _ident(value: str, where: str) -> str:
    if not ID.match(value):
        raise ConfigError(f"{where}: {value!r} is not a valid id (letters, digits, '.', '_', '-'; max 64)")
    return value


def _path(value: Any, where: str, base: Path) -> Path:
    text = _as_str(value, where) if not isinstance(value, os.PathLike) else os.fspath(value)
    if not text:
        raise ConfigError(f"{where} must not be empty")
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _topic_prefix(value: Any, where: str) -> str:
    from edgekit.errors import TopicError
    from edgekit.topics import Topics

    text = _as_str(value, where)
    try:
        Topics(text)
    except TopicError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return text


def _runtime(value: Any, where: str) -> str:
    text = _as_str(value, where)
    if text != "auto" and text not in RUNTIMES:
        raise ConfigError(f"{where}: unknown runtime {text!r}; choose auto, {', '.join(RUNTIMES)}")
    return text


def _max_size(value: int, where: str) -> int:
    if value > MAX_BUNDLE_SIZE:
        raise ConfigError(f"{where} must be at most {MAX_BUNDLE_SIZE} bytes, not {value}")
    return value
