"""SWUpdate's IPC messages (2022.12, ``network_ipc.h`` and ``progress_ipc.h``) as construct layouts.

SWUpdate talks over two AF_UNIX stream sockets in its ``TMPDIR``:

* ``sockinstctrl`` (control): every message either way is one fixed-size ``ipc_message``.  The
  daemon reads a request with a single ``read`` and drops anything shorter, so a client sends
  each message in one write.  An install is: send ``REQ_INSTALL`` carrying a ``swupdate_request``
  in ``data.instmsg.req`` -> read one ``ipc_message`` back, ``ACK`` or ``NACK`` (with a reason in
  ``data.msg``, e.g. "Installation in progress") -> after ``ACK`` write the raw ``.swu`` bytes on
  the same connection -> close it to mark the end of the image.  ``GET_STATUS`` is answered with
  ``data.status``; ``NOTIFY_STREAM`` with ``ACK`` and then a stream of ``data.notify`` records.
* ``swupdateprog`` (progress): no handshake; the daemon writes one fixed-size ``progress_msg``
  per event (``START``, ``RUN``, ``PROGRESS`` ..., then ``SUCCESS`` or ``FAILURE``).

The structs are C layouts in the daemon's native byte order and ABI, so their sizes and padding
depend on the platform: `Abi` describes what matters (byte order, width of ``size_t``, alignment
of a 64-bit integer) and `NATIVE` is the running interpreter's.  Sizes of ``ipc_message`` /
``progress_msg``:

* `LP64` (x86_64, aarch64): 3120 / 2416 bytes, measured with ``offsetof`` against the headers;
* `ILP32_EABI` (armhf): 3104 / 2416, measured with ``arm-linux-gnueabihf-gcc`` (64-bit fields
  are 8-aligned on ARM EABI, so ``dwl_bytes`` is preceded by padding as on LP64);
* `ILP32_I386`: 3104 / 2408, derived from the i386 rule that 64-bit fields in structs are only
  4-aligned (not measured).

The layouts are computed from field lists with C's alignment rules (`_c_struct`,
`_c_union_size`) rather than hand-placed padding, so one definition serves every ABI; the tests
pin the LP64 and armhf offsets to the measured values and compare the native layout with
ctypes'.  They are 2022.12's; 2023.12 adds union members of the same size and renames
``progress_msg.magic`` to ``apiversion``, so a newer daemon needs its own review.

Fixed ``char`` arrays are decoded up to their first NUL: the daemon clears a string by writing a
NUL into byte 0 and leaves the rest (``"\\0ayload.bin"`` has been seen), so bytes after the first
NUL are garbage.  They are decoded as UTF-8 with replacement because they are only ever shown
to a human.  Building refuses a string that does not fit with its terminating NUL.

Anything malformed (wrong length, wrong magic, a string too long to build) raises
`IpcFormatError` with a one-line reason; callers turn it into their own error.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from typing import Any, Final, Literal

from construct import (
    Bytes,
    ConstructError,
    Flag,
    Int32sb,
    Int32sl,
    Int32ub,
    Int32ul,
    Int64ub,
    Int64ul,
    Padded,
    Padding,
    Struct,
)

# ``ipc_message.magic``: the daemon drops control messages without it.
IPC_MAGIC: Final = 0x14052001
# ``swupdate_request.apiversion``: the daemon NACKs any other value.
SWUPDATE_API_VERSION: Final = 1

# Sizes of the fixed char arrays (network_ipc.h / progress_ipc.h, 2022.12).
INFO_LEN: Final = 512  # swupdate_request.info
SET_LEN: Final = 256  # swupdate_request.software_set and .running_mode
BUF_LEN: Final = 2048  # instmsg.buf, status.desc, notify.msg, progress_msg.info
MSG_LEN: Final = 128  # the union's plain ``msg`` member (a NACK's reason)
IMAGE_NAME_LEN: Final = 256  # progress_msg.cur_image
HANDLER_NAME_LEN: Final = 64  # progress_msg.hnd_name


class IpcFormatError(ValueError):
    """Bytes that are not a well-formed message of this ABI, or a value that cannot be built."""


# --- Enums (2022.12 values) ----------------------------------------------------------------------


class MsgType(IntEnum):
    REQ_INSTALL = 0
    ACK = 1
    NACK = 2
    GET_STATUS = 3
    POST_UPDATE = 4
    SWUPDATE_SUBPROCESS = 5
    SET_AES_KEY = 6
    SET_UPDATE_STATE = 7
    GET_UPDATE_STATE = 8
    REQ_INSTALL_EXT = 9
    SET_VERSIONS_RANGE = 10
    NOTIFY_STREAM = 11
    GET_HW_REVISION = 12


class RecoveryStatus(IntEnum):
    IDLE = 0
    START = 1
    RUN = 2
    SUCCESS = 3
    FAILURE = 4
    DOWNLOAD = 5
    DONE = 6
    SUBPROCESS = 7
    PROGRESS = 8


class SourceType(IntEnum):
    UNKNOWN = 0
    WEBSERVER = 1
    SURICATTA = 2
    DOWNLOADER = 3
    LOCAL = 4
    CHUNKS_DOWNLOADER = 5


class RunType(IntEnum):
    DEFAULT = 0
    DRYRUN = 1
    INSTALL = 2


class NotifyLevel(IntEnum):
    """``notify.level`` (swupdate's log levels)."""

    OFF = 0
    ERROR = 1
    WARN = 2
    INFO = 3
    DEBUG = 4
    TRACE = 5


def enum_name(enum: type[IntEnum], value: int) -> str:
    """The enum member's name, or the number for a value this version does not know."""
    try:
        return enum(value).name
    except ValueError:
        return str(value)


# --- ABI and C layout rules ----------------------------------------------------------------------


@dataclass(frozen=True)
class Abi:
    """What the C layouts depend on: byte order, ``sizeof(size_t)``, ``alignof(uint64_t)``."""

    name: str
    byteorder: Literal["little", "big"]
    size_t: int
    u64_align: int

    def __post_init__(self) -> None:
        if self.size_t not in (4, 8) or self.u64_align not in (4, 8):
            raise ValueError(f"unsupported ABI {self}")


LP64: Final = Abi("LP64", "little", 8, 8)  # x86_64, aarch64
ILP32_EABI: Final = Abi("ILP32 ARM EABI", "little", 4, 8)  # armhf: 64-bit fields 8-aligned
ILP32_I386: Final = Abi("ILP32 i386", "little", 4, 4)  # i386: 64-bit fields 4-aligned in structs


def native_abi() -> Abi:
    """The running interpreter's ABI (the daemon on the same machine shares it)."""
    byteorder: Literal["little", "big"] = "little" if sys.byteorder == "little" else "big"
    size_t = struct.calcsize("@N")
    # struct's native mode applies the C compiler's alignment: "@iq" is an int followed by an
    # aligned long long, so its size minus 8 is alignof(long long) inside a struct.
    u64_align = struct.calcsize("@iq") - 8
    for known in (LP64, ILP32_EABI, ILP32_I386):
        if (known.byteorder, known.size_t, known.u64_align) == (byteorder, size_t, u64_align):
            return known
    name = f"native ({byteorder}-endian, {8 * size_t}-bit size_t)"
    return Abi(name, byteorder, size_t, u64_align)


NATIVE: Final = native_abi()


@dataclass(frozen=True)
class _CType:
    con: Any  # a construct of exactly `size` bytes
    size: int
    align: int


def _c_struct(fields: Sequence[tuple[str, _CType]]) -> _CType:
    """A C struct: each field at the next multiple of its alignment, size padded to the largest."""
    items: list[Any] = []
    offset = 0
    align = 1
    for name, ctype in fields:
        gap = -offset % ctype.align
        if gap:
            items.append(Padding(gap))
        items.append(name / ctype.con)
        offset += gap + ctype.size
        align = max(align, ctype.align)
    tail = -offset % align
    if tail:
        items.append(Padding(tail))
    return _CType(Struct(*items), offset + tail, align)


def _c_union_size(members: Sequence[_CType]) -> tuple[int, int]:
    """(size, alignment) of a C union of `members`."""
    align = max(m.align for m in members)
    size = max(m.size for m in members)
    return size + -size % align, align


def _char_array(length: int) -> _CType:
    return _CType(Bytes(length), length, 1)


@dataclass(frozen=True)
class Layouts:
    """The construct definitions of one ABI.  Members are padded to the union's size."""

    abi: Abi
    ipc_message: Any
    ipc_message_size: int
    union_size: int
    instmsg: Any
    status: Any
    notify: Any
    text: Any
    progress_msg: Any
    progress_msg_size: int


@cache
def layouts(abi: Abi = NATIVE) -> Layouts:
    """The construct definitions for `abi` (built once per ABI)."""
    little = abi.byteorder == "little"
    i32 = _CType(Int32sl if little else Int32sb, 4, 4)
    u32 = _CType(Int32ul if little else Int32ub, 4, 4)
    u64 = _CType(Int64ul if little else Int64ub, 8, abi.u64_align)
    # size_t is as aligned as it is wide (unlike uint64_t on i386).
    size_t = _CType(u64.con, 8, 8) if abi.size_t == 8 else u32
    boolean = _CType(Flag, 1, 1)

    request = _c_struct(
        [
            ("apiversion", u32),
            ("source", i32),
            ("dry_run", i32),
            ("len", size_t),
            ("info", _char_array(INFO_LEN)),
            ("software_set", _char_array(SET_LEN)),
            ("running_mode", _char_array(SET_LEN)),
            ("disable_store_swu", boolean),
        ]
    )
    instmsg = _c_struct([("req", request), ("len", u32), ("buf", _char_array(BUF_LEN))])
    status = _c_struct(
        [("current", i32), ("last_result", i32), ("error", i32), ("desc", _char_array(BUF_LEN))]
    )
    notify = _c_struct(
        [("status", i32), ("error", i32), ("level", i32), ("msg", _char_array(BUF_LEN))]
    )
    procmsg = _c_struct(
        [
            ("source", i32),
            ("cmd", i32),
            ("timeout", i32),
            ("len", u32),
            ("buf", _char_array(BUF_LEN)),
        ]
    )
    # Members the union has but otacast never sends; they are listed so the union's size is the
    # C one (the daemon drops a message of any other size).
    others = [
        _char_array(MSG_LEN),  # msg
        _char_array(65 + 33),  # aeskeymsg: key_ascii, ivt_ascii
        _char_array(3 * 256),  # versions: minimum, maximum, current
        _char_array(2 * 256),  # revisions: boardname, revision
        procmsg,
    ]
    union_size, union_align = _c_union_size([instmsg, status, notify, *others])
    message = _c_struct(
        [
            ("magic", i32),
            ("type", i32),
            ("data", _CType(Bytes(union_size), union_size, union_align)),
        ]
    )
    progress = _c_struct(
        [
            ("magic", u32),
            ("status", i32),
            ("dwl_percent", u32),
            ("dwl_bytes", u64),
            ("nsteps", u32),
            ("cur_step", u32),
            ("cur_percent", u32),
            ("cur_image", _char_array(IMAGE_NAME_LEN)),
            ("hnd_name", _char_array(HANDLER_NAME_LEN)),
            ("source", i32),
            ("infolen", u32),
            ("info", _char_array(BUF_LEN)),
        ]
    )
    # The computed sizes are what construct builds and parses.
    assert message.con.sizeof() == message.size and progress.con.sizeof() == progress.size
    return Layouts(
        abi=abi,
        ipc_message=message.con,
        ipc_message_size=message.size,
        union_size=union_size,
        instmsg=Padded(union_size, instmsg.con),
        status=Padded(union_size, status.con),
        notify=Padded(union_size, notify.con),
        text=Padded(union_size, Bytes(MSG_LEN)),
        progress_msg=progress.con,
        progress_msg_size=progress.size,
    )


def ipc_message_size(abi: Abi = NATIVE) -> int:
    return layouts(abi).ipc_message_size


def progress_msg_size(abi: Abi = NATIVE) -> int:
    return layouts(abi).progress_msg_size


# --- Strings -------------------------------------------------------------------------------------


def decode_chars(raw: bytes) -> str:
    """A C char array as text: up to the first NUL (the rest may be stale garbage)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def encode_chars(text: str, length: int, field: str) -> bytes:
    """`text` NUL-padded to `length` bytes; it must leave room for the terminating NUL."""
    try:
        raw = text.encode("utf-8", errors="strict")
    except UnicodeEncodeError:  # a lone surrogate
        raise IpcFormatError(f"{field} is not encodable as UTF-8") from None
    if b"\0" in raw:
        raise IpcFormatError(f"{field} must not contain a NUL character")
    if len(raw) >= length:
        raise IpcFormatError(f"{field} is {len(raw)} bytes; at most {length - 1} fit")
    return raw.ljust(length, b"\0")


# --- Union members -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallRequest:
    """``data.instmsg.req`` of ``REQ_INSTALL``: announce an image of `length` bytes."""

    length: int
    info: str = ""
    source: int = SourceType.LOCAL
    run_type: int = RunType.INSTALL
    software_set: str = ""
    running_mode: str = ""
    disable_store_swu: bool = False
    apiversion: int = SWUPDATE_API_VERSION


@dataclass(frozen=True)
class Status:
    """``data.status``, the answer to ``GET_STATUS``."""

    current: int
    last_result: int
    error: int
    desc: str


@dataclass(frozen=True)
class Notify:
    """``data.notify``, one record of a ``NOTIFY_STREAM``."""

    status: int
    error: int
    level: int
    msg: str


@dataclass(frozen=True)
class Text:
    """``data.msg``: the short text a ``NACK`` carries."""

    msg: str


Member = InstallRequest | Status | Notify | Text


@dataclass(frozen=True)
class IpcMessage:
    """One parsed ``ipc_message``; `data` is the raw union, decoded on demand by member."""

    type: int
    data: bytes
    abi: Abi = NATIVE

    @property
    def type_name(self) -> str:
        return enum_name(MsgType, self.type)

    def install_request(self) -> InstallRequest:
        req = _parse(layouts(self.abi).instmsg, self.data).req
        return InstallRequest(
            length=req.len,
            info=decode_chars(req.info),
            source=req.source,
            run_type=req.dry_run,
            software_set=decode_chars(req.software_set),
            running_mode=decode_chars(req.running_mode),
            disable_store_swu=bool(req.disable_store_swu),
            apiversion=req.apiversion,
        )

    def status(self) -> Status:
        s = _parse(layouts(self.abi).status, self.data)
        return Status(s.current, s.last_result, s.error, decode_chars(s.desc))

    def notify(self) -> Notify:
        n = _parse(layouts(self.abi).notify, self.data)
        return Notify(n.status, n.error, n.level, decode_chars(n.msg))

    def text(self) -> Text:
        return Text(decode_chars(_parse(layouts(self.abi).text, self.data)))


def _parse(con: Any, data: bytes) -> Any:
    try:
        return con.parse(data)
    except ConstructError as exc:  # only reachable with a union of the wrong size
        raise IpcFormatError(f"malformed SWUpdate message: {exc}") from None


def _build(con: Any, value: Any, what: str) -> bytes:
    try:
        return bytes(con.build(value))
    except ConstructError as exc:  # a number out of its field's range
        raise IpcFormatError(f"cannot build {what}: {exc}".splitlines()[0]) from None


def _member_bytes(member: Member | None, lay: Layouts) -> bytes:
    if member is None:
        return bytes(lay.union_size)
    if isinstance(member, InstallRequest):
        req = {
            "apiversion": member.apiversion,
            "source": member.source,
            "dry_run": member.run_type,
            "len": member.length,
            "info": encode_chars(member.info, INFO_LEN, "info"),
            "software_set": encode_chars(member.software_set, SET_LEN, "software_set"),
            "running_mode": encode_chars(member.running_mode, SET_LEN, "running_mode"),
            "disable_store_swu": member.disable_store_swu,
        }
        return _build(lay.instmsg, {"req": req, "len": 0, "buf": bytes(BUF_LEN)}, "instmsg")
    if isinstance(member, Status):
        value = {
            "current": member.current,
            "last_result": member.last_result,
            "error": member.error,
            "desc": encode_chars(member.desc, BUF_LEN, "desc"),
        }
        return _build(lay.status, value, "status")
    if isinstance(member, Notify):
        value = {
            "status": member.status,
            "error": member.error,
            "level": member.level,
            "msg": encode_chars(member.msg, BUF_LEN, "msg"),
        }
        return _build(lay.notify, value, "notify")
    return _build(lay.text, encode_chars(member.msg, MSG_LEN, "msg"), "msg")


# --- ipc_message ---------------------------------------------------------------------------------


def build_ipc_message(msgtype: int, member: Member | None = None, abi: Abi = NATIVE) -> bytes:
    """One ``ipc_message`` of `msgtype` with `member` in its union (zeros without one)."""
    lay = layouts(abi)
    value = {"magic": IPC_MAGIC, "type": msgtype, "data": _member_bytes(member, lay)}
    return _build(lay.ipc_message, value, "ipc_message")


def parse_ipc_message(data: bytes, abi: Abi = NATIVE) -> IpcMessage:
    """Parse exactly one ``ipc_message``; the magic must be SWUpdate's."""
    lay = layouts(abi)
    if len(data) != lay.ipc_message_size:
        raise IpcFormatError(
            f"an ipc_message is {lay.ipc_message_size} bytes ({abi.name}), got {len(data)}"
        )
    parsed = _parse(lay.ipc_message, data)
    if parsed.magic != IPC_MAGIC:
        raise IpcFormatError(
            f"not an SWUpdate ipc_message: magic {parsed.magic & 0xFFFFFFFF:#010x}, "
            f"expected {IPC_MAGIC:#010x}"
        )
    return IpcMessage(parsed.type, bytes(parsed.data), abi)


# --- progress_msg --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressMsg:
    """One ``progress_msg``.  ``infolen`` is not kept: building sets it to the length of `info`.

    ``magic`` is kept but never checked: 2022.12 leaves it 0 (2023 renamed it ``apiversion``).
    """

    status: int
    dwl_percent: int = 0
    dwl_bytes: int = 0
    nsteps: int = 0
    cur_step: int = 0
    cur_percent: int = 0
    cur_image: str = ""
    hnd_name: str = ""
    source: int = SourceType.UNKNOWN
    info: str = ""
    magic: int = 0

    @property
    def status_name(self) -> str:
        return enum_name(RecoveryStatus, self.status)


def build_progress_msg(msg: ProgressMsg, abi: Abi = NATIVE) -> bytes:
    info = encode_chars(msg.info, BUF_LEN, "info")
    value = {
        "magic": msg.magic,
        "status": msg.status,
        "dwl_percent": msg.dwl_percent,
        "dwl_bytes": msg.dwl_bytes,
        "nsteps": msg.nsteps,
        "cur_step": msg.cur_step,
        "cur_percent": msg.cur_percent,
        "cur_image": encode_chars(msg.cur_image, IMAGE_NAME_LEN, "cur_image"),
        "hnd_name": encode_chars(msg.hnd_name, HANDLER_NAME_LEN, "hnd_name"),
        "source": msg.source,
        "infolen": len(info.rstrip(b"\0")),
        "info": info,
    }
    return _build(layouts(abi).progress_msg, value, "progress_msg")


def parse_progress_msg(data: bytes, abi: Abi = NATIVE) -> ProgressMsg:
    """Parse exactly one ``progress_msg``."""
    lay = layouts(abi)
    if len(data) != lay.progress_msg_size:
        raise IpcFormatError(
            f"a progress_msg is {lay.progress_msg_size} bytes ({abi.name}), got {len(data)}"
        )
    p = _parse(lay.progress_msg, data)
    return ProgressMsg(
        status=p.status,
        dwl_percent=p.dwl_percent,
        dwl_bytes=p.dwl_bytes,
        nsteps=p.nsteps,
        cur_step=p.cur_step,
        cur_percent=p.cur_percent,
        cur_image=decode_chars(p.cur_image),
        hnd_name=decode_chars(p.hnd_name),
        source=p.source,
        info=decode_chars(p.info),
        magic=p.magic,
    )
