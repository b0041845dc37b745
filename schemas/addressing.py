"""Channel name -> multicast groups and the DNS SRV name.

A channel is a DNS name chosen by the publisher (``updates.example.com``).  Every device derives
the same groups from it without any rendezvous:

* ASM: ``ff1<scope>::/16`` followed by the first 112 bits of the group hash;
* SSM: ``ff3<scope>::/96`` followed by a 32-bit group id taken from the hash with the top bit set
  (RFC 3307 reserves ``0x80000000-0xffffffff`` for dynamically allocated SSM group ids);
* SRV: ``_otacast._udp.<channel>`` names the SSM sources.

The group hash is ``SHA-256("otacast-group\\0" + channel + "\\0" + rate_index)``, where
``rate_index`` is one byte: 0 for the main channel, 1.. for additional rate channels, so each
rate gets its own groups and a receiver joins only the one it can absorb.  Rate index
``LANE_RATE_INDEX`` (255; a manifest lists at most `limits.MAX_RATE_CHANNELS` rates) names the
delta lane's groups: devices that hold a recent release join it instead of the full carousel.
Rate index ``INDEX_RATE_INDEX`` (254) names the index group's: the new release's full block index
alone, which a device joins for as long as it needs the index (a lane device without its installed
index, a device reusing local blocks beside the carousel).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

SCOPES: dict[str, int] = {"link": 0x2, "site": 0x5, "org": 0x8, "global": 0xE}
DEFAULT_SCOPE = "global"
DEFAULT_PORT = 4242
SRV_SERVICE = "_otacast._udp"
LANE_RATE_INDEX = 255
INDEX_RATE_INDEX = 254

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_DNS_NAME = 253


def normalise_channel(name: str) -> str:
    """Lower-case, strip one trailing dot, and check DNS name syntax; raises ValueError."""
    channel = name.strip().lower()
    if channel.endswith("."):
        channel = channel[:-1]
    if not channel or len(channel) > MAX_DNS_NAME - len(SRV_SERVICE) - 1:
        raise ValueError(f"channel name {name!r} has an invalid length")
    if not all(_LABEL.fullmatch(label) for label in channel.split(".")):
        raise ValueError(f"channel name {name!r} is not a valid DNS name")
    return channel


def _group_hash(channel: str, rate_index: int) -> bytes:
    if not 0 <= rate_index <= 255:
        raise ValueError("rate index out of range")
    material = b"otacast-group\0" + channel.encode("ascii") + b"\0" + bytes([rate_index])
    return hashlib.sha256(material).digest()


def asm_group(channel: str, scope: str = DEFAULT_SCOPE, rate_index: int = 0) -> str:
    digest = _group_hash(normalise_channel(channel), rate_index)
    raw = bytes([0xFF, 0x10 | SCOPES[scope]]) + digest[:14]
    return str(ipaddress.IPv6Address(raw))


def ssm_group(channel: str, scope: str = DEFAULT_SCOPE, rate_index: int = 0) -> str:
    digest = _group_hash(normalise_channel(channel), rate_index)
    group_id = int.from_bytes(digest[:4], "big") | 0x80000000
    raw = bytes([0xFF, 0x30 | SCOPES[scope]]) + bytes(10) + group_id.to_bytes(4, "big")
    return str(ipaddress.IPv6Address(raw))


def srv_name(channel: str) -> str:
    return f"{SRV_SERVICE}.{normalise_channel(channel)}"


def normalise_group(address: str) -> str:
    """The compressed normal form of an IPv6 address; ValueError for anything else, including
    a zone index (``%eth0``), which a group in a signed manifest must never carry."""
    if "%" in address:
        raise ValueError(f"{address!r} carries a zone index")
    return str(ipaddress.IPv6Address(address))


def _packed_normal(address: str) -> bytes | None:
    try:
        if normalise_group(address) != address:
            return None
    except ValueError:
        return None
    return ipaddress.IPv6Address(address).packed


def is_asm_group(address: str) -> bool:
    """A transient (flag T) any-source multicast group, in normal form."""
    raw = _packed_normal(address)
    return raw is not None and raw[0] == 0xFF and raw[1] >> 4 == 0x1


def is_ssm_group(address: str) -> bool:
    """A group in ``ff3x::/96`` (source-specific), in normal form."""
    raw = _packed_normal(address)
    return raw is not None and raw[0] == 0xFF and raw[1] >> 4 == 0x3 and raw[2:12] == bytes(10)
