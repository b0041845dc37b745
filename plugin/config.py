"""The device configuration file: ``/etc/otacast/otacast.toml`` (or ``--config``, or
``$OTACAST_CONFIG``).

One flat TOML table whose keys are the long options of ``otacast fetch``/``install``/``watch``
with ``_`` for ``-``, so every setting can be tried on the command line first and then written
down.  An option given on the command line wins over the file; the file wins over the built-in
default.  Paths in the file (trust keys, state directory, installer targets are the installer's
business) are taken relative to the file's directory, so a config and its keys can move together.

One setting is a table of its own, local reuse (`otacast.plugin.reuse`)::

    [reuse]
    sources = ["/dev/mmcblk0p2", "/data/old.img"]  # files or block devices holding an older image
    enabled = true                                  # false: always download every byte

The file is the device's policy (which keys it trusts, what it installs), so anything unexpected
in it is an error, never ignored: an unknown key is usually a typo of a setting the operator
believes is in force.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from otacast.schemas import addressing

from .auth import PACKET_AUTH_POLICIES
from .errors import ConfigError, ReadError

DEFAULT_PATH = Path("/etc/otacast/otacast.toml")
ENVIRONMENT = "OTACAST_CONFIG"
# A device config is a few hundred bytes; refuse anything that cannot be one before parsing.
MAX_CONFIG_BYTES = 64 * 1024

FALLBACKS = ("auto", "only", "never")
# Where received symbols are kept until their chunk completes: "store" (the default: every
# admitted symbol in the durable symbol store in the state directory, nothing refused, resume
# keeps symbols) or "memory" (decoders for a bounded number of chunks at once: for images that fit
# the decoder budget only; see otacast.plugin.receive).
SYMBOL_KEEPING = ("memory", "store")
# Where the symbol store's chunks are decoded: "inline" (the default: on the receive loop) or
# "worker" (a worker process, otacast.plugin.decode_worker: the loop reads on while a chunk
# decodes, and decodes the next one itself meanwhile, for ~50 MB more peak memory; see
# docs/PERFORMANCE.md, "Decode worker").
DECODE_PLACES = ("inline", "worker")


@dataclass(frozen=True)
class DeviceConfig:
    """Settings from the file; None where the file does not set them."""

    path: Path | None = None
    trust: tuple[Path, ...] | None = None
    threshold: int | None = None
    device_type: str | None = None
    state_dir: Path | None = None
    interface: str | None = None
    channel: str | None = None
    scope: str | None = None
    group: str | None = None
    port: int | None = None
    source: tuple[str, ...] | None = None
    resolver: str | None = None
    fallback: str | None = None
    join_timeout: float | None = None
    stall_timeout: float | None = None
    installer: str | None = None
    out: Path | None = None
    retry_max: float | None = None
    packet_auth: str | None = None
    symbols: str | None = None
    decode: str | None = None
    metrics_file: Path | None = None
    keep_staged: bool | None = None
    reuse: bool | None = None  # [reuse] enabled
    reuse_sources: tuple[Path, ...] | None = None  # [reuse] sources


def _text(value: object) -> bool:
    return isinstance(value, str) and value != "" and value.isprintable()


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _list_of_text(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(_text(v) for v in value)


# The [reuse] table's keys -> (check, what a valid value is).
_REUSE_RULES: dict[str, tuple[Any, str]] = {
    "sources": (
        lambda v: isinstance(v, list) and all(_text(p) for p in v),
        "a list of paths (files or block devices)",
    ),
    "enabled": (lambda v: isinstance(v, bool), "true or false"),
}


def _reuse_table(value: object) -> bool:
    return isinstance(value, dict) and all(
        key in _REUSE_RULES and _REUSE_RULES[key][0](v) for key, v in value.items()
    )


# key -> (check, what a valid value is)
_RULES: dict[str, tuple[Any, str]] = {
    "trust": (_list_of_text, "a non-empty list of key file paths"),
    "threshold": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "≥ 1"),
    "device_type": (_text, "a string"),
    "state_dir": (_text, "a path"),
    "interface": (_text, "an interface name"),
    "channel": (_text, "a channel name"),
    "scope": (lambda v: v in addressing.SCOPES, "one of " + ", ".join(sorted(addressing.SCOPES))),
    "group": (_text, "an IPv6 group address"),
    "port": (_port, "a port number 1-65535"),
    "source": (_list_of_text, "a non-empty list of source addresses"),
    "resolver": (_text, "ADDR or [ADDR]:PORT"),
    "fallback": (lambda v: v in FALLBACKS, "one of " + ", ".join(FALLBACKS)),
    "join_timeout": (_number, "seconds, more than 0"),
    "stall_timeout": (_number, "seconds, more than 0"),
    "installer": (_text, "KIND:ARGUMENT, e.g. file:/data/rootfs.img"),
    "out": (_text, "a path"),
    "retry_max": (_number, "seconds, more than 0"),
    "packet_auth": (
        lambda v: v in PACKET_AUTH_POLICIES,
        "one of " + ", ".join(PACKET_AUTH_POLICIES),
    ),
    "symbols": (lambda v: v in SYMBOL_KEEPING, "one of " + ", ".join(SYMBOL_KEEPING)),
    "decode": (lambda v: v in DECODE_PLACES, "one of " + ", ".join(DECODE_PLACES)),
    "metrics_file": (_text, "a path"),
    "keep_staged": (lambda v: isinstance(v, bool), "true or false"),
    "reuse": (
        _reuse_table,
        "a table [reuse] with " + " and ".join(f"{k} ({w})" for k, (_, w) in _REUSE_RULES.items()),
    ),
}
_PATHS = {"state_dir", "out", "metrics_file"}
assert set(_RULES) == {f.name for f in fields(DeviceConfig)} - {"path", "reuse_sources"}


def config_path(explicit: Path | None) -> tuple[Path, bool]:
    """The file to read and whether it must exist (given explicitly) or is optional."""
    if explicit is not None:
        return explicit, True
    from_environment = os.environ.get(ENVIRONMENT)
    if from_environment:
        return Path(from_environment), True
    return DEFAULT_PATH, False


def load_config(explicit: Path | None = None) -> DeviceConfig:
    path, required = config_path(explicit)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if required:
            raise ReadError(f"config {path} does not exist") from None
        return DeviceConfig()
    except OSError as exc:
        raise ReadError(f"cannot read config {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    return parse_config(table, path)


def parse_config(table: Mapping[str, Any], path: Path) -> DeviceConfig:
    values: dict[str, Any] = {}
    base = path.parent
    for key, value in table.items():
        rule = _RULES.get(key)
        if rule is None:
            known = ", ".join(sorted(_RULES))
            raise ConfigError(f"config {path}: unknown setting {key!r} (known: {known})")
        check, expected = rule
        if not check(value):
            raise ConfigError(f"config {path}: {key} must be {expected}, not {value!r}")
        if key == "trust":
            values[key] = tuple(base / str(v) for v in value)
        elif key == "source":
            values[key] = tuple(str(v) for v in value)
        elif key in _PATHS:
            values[key] = base / str(value)
        elif key in ("join_timeout", "stall_timeout", "retry_max"):
            values[key] = float(value)
        elif key == "reuse":
            if "enabled" in value:
                values["reuse"] = value["enabled"]
            if "sources" in value:
                values["reuse_sources"] = tuple(base / str(v) for v in value["sources"])
        else:
            values[key] = value
    return DeviceConfig(path=path, **values)


DEFAULT_STATE_DIR = Path("/var/lib/otacast")
# The file a received image is written to when neither --out nor `out` names one: inside the
# state directory, so the final rename out of staging stays on one filesystem.
DEFAULT_OUT_NAME = "received.img"
# The longest pause between retries of `watch` after a failure (DNS, HTTP, installer): long
# enough not to hammer a broken mirror, short enough that a fixed one is used within minutes.
DEFAULT_RETRY_MAX = 300.0


@dataclass(frozen=True)
class Settings:
    """The settings in force: the command line over the config file over built-in defaults."""

    trust: tuple[Path, ...]
    threshold: int = 1
    device_type: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    interface: str | None = None
    channel: str | None = None
    scope: str = addressing.DEFAULT_SCOPE
    group: str | None = None
    port: int | None = None
    source: tuple[str, ...] = ()
    resolver: str | None = None
    fallback: str = "auto"
    join_timeout: float = 10.0
    stall_timeout: float = 30.0
    installer: str | None = None
    out: Path | None = None
    retry_max: float = DEFAULT_RETRY_MAX
    packet_auth: str = "auto"
    symbols: str = "store"
    decode: str = "inline"
    metrics_file: Path | None = None  # watch's node_exporter textfile (otacast.plugin.metrics)
    # Keep the received image (`out_path`) after a successful install; by default it is removed,
    # so the state directory never needs room for a second image (`otacast.plugin.deliver`).
    keep_staged: bool = False
    # Local reuse (`otacast.plugin.reuse`): on unless disabled; the sources besides those the
    # installer names.
    reuse: bool = True
    reuse_sources: tuple[Path, ...] = ()
    config: Path | None = None

    @property
    def out_path(self) -> Path:
        return self.out if self.out is not None else self.state_dir / DEFAULT_OUT_NAME


def settle(config: DeviceConfig, given: Mapping[str, Any]) -> Settings:
    """Merge command-line values (None = not given) over the file's."""
    values: dict[str, Any] = {
        f.name: getattr(config, f.name) for f in fields(DeviceConfig) if f.name != "path"
    }
    for key, value in given.items():
        if key in values and value is not None and value != []:
            values[key] = tuple(value) if isinstance(value, list) else value
    if not values["trust"]:
        where = f" (read {config.path})" if config.path else f" ({DEFAULT_PATH} does not exist)"
        raise ConfigError(
            f"no trusted keys: give --trust KEY.pub or set trust = [...] in the config{where}"
        )
    chosen = {k: v for k, v in values.items() if v is not None}
    return Settings(config=config.path, **chosen)
