"""``otacast-mender-module``: otacast as the delivery path of Mender (update module protocol v3,
payload type ``otacast``).

Theory of operation.  A Mender artifact of type ``otacast`` carries no image, only the signed
otacast manifest, base64 in the artifact's meta-data (``{"otacast_manifest": "..."}``, made by
``otacast-signer mender-artifact``).  Mender checks the artifact (its own optional RSA/ECDSA
signature, the device type) and then runs this program once per state, as root, as
``otacast-mender-module STATE FILE_TREE``; what one state learns for the next is kept in
``STATE_DIR/mender/`` (the staged image, the verified manifest, ``state.json``):

- ``Download``: decode the manifest and verify it exactly as ``otacast fetch`` would (trusted
  keys and threshold, expiry, this device's type from the config *and* from Mender, and the
  anti-rollback floor of ``STATE_DIR/installed.json``) before anything touches the network; then
  receive the image over multicast with HTTP fallback into ``STATE_DIR/mender/image``, never the
  final target (Mender's rule: nothing is installed in Download).
- ``ArtifactInstall``: re-check the staged image against the manifest, hand it to the configured
  installer (``installer`` in the config) and remember what the installer said.
- ``ArtifactCommit``: make the install permanent, then record it in ``installed.json``, so the
  anti-rollback floor of every otacast path follows what Mender committed.
- ``ArtifactRollback``: the installer restores what was there before (a no-op if nothing was
  installed).  ``Cleanup`` and ``ArtifactFailure`` remove the staged files.
- Queries: ``SupportsRollback`` is ``Yes`` when the installer can put the old content back (the
  file installer, with something to put back); ``NeedsArtifactReboot`` is ``Automatic`` (Mender
  reboots) when the installer said the image is active only after a restart, else ``No``.
- Any other state (the reboot states, later additions to the protocol) prints nothing and
  succeeds, as the protocol asks.

The states after Download re-verify the stored manifest (signatures, device type, the current
anti-rollback floor) because each is a new process reading files back from disk; expiry is judged
once, at Download time (stored as ``verified_at``): a release accepted for download must not
become un-committable because its manifest expired while it was being installed.

Partial downloads of an unfinished release stay in the state directory (as with ``otacast
fetch``), so Mender's next attempt at the same release resumes instead of starting over.

Failures print one line, ``otacast-mender-module: error: ...``, which Mender logs, and exit with
the error class's code (README, "Exit codes"); Mender treats any non-zero status as failure.

``otacast-mender-module --install-module`` links this program into Mender's module directory
(``/usr/share/mender/modules/v3/otacast``; Mender 3.x does not make that path configurable).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import NoReturn, TextIO

from otacast.schemas.errors import (
    ImageMismatch,
    MalformedManifest,
    ManifestTooLarge,
    OtacastError,
    WrongDevice,
)
from otacast.schemas.limits import MAX_MANIFEST_BYTES
from otacast.schemas.policy import TrustSet, VerifiedManifest

from .config import Settings, load_config, settle
from .durable import write_durably
from .errors import InstallError, ReadError, StateError, UsageError
from .installed import read_installed, write_installed
from .installers import Installer, get_installer
from .installers.file import FileInstaller
from .receive import FetchOptions, fetch
from .status import StatusFile
from .trust import current_trust, read_limited
from .verify import verify_manifest

PROG = "otacast-mender-module"
# The payload type (mender-artifact -T) this module handles; Mender runs the module named after
# it.  The publisher's `otacast-signer mender-artifact` writes the same name and key.
PAYLOAD_TYPE = "otacast"
META_DATA_KEY = "otacast_manifest"
MODULES_DIR = Path("/usr/share/mender/modules/v3")

# The meta-data holds a manifest of at most MAX_MANIFEST_BYTES as base64 (4 characters per 3
# bytes) plus the JSON around it; 4 KiB covers that framing (mender-artifact re-serialises the
# JSON) many times over.  Both mender-artifact 3.9 and the mender 3.4 client were seen carrying
# 3 MB of meta-data, above this bound.
MAX_BASE64_CHARS = 4 * -(-MAX_MANIFEST_BYTES // 3)
MAX_META_DATA_BYTES = MAX_BASE64_CHARS + 4096
# The other tree files we read (artifact name, device type) are one short line each.
MAX_TREE_FILE_BYTES = 4096
# The module's own state record is a few hundred bytes.
MAX_STATE_BYTES = 64 * 1024
# Read granularity when re-hashing the staged image: streams at disk speed in flat memory.
HASH_BLOCK = 1024 * 1024

STAGING_DIR = "mender"  # under the otacast state directory
IMAGE = "image"
MANIFEST = "manifest.json"
STATE = "state.json"

INSTALLED_STATUSES = ("installed", "needs-reboot")


# --- The artifact's meta-data (untrusted until the manifest inside is verified) ----------------


def decode_meta_data(data: bytes) -> bytes:
    """``header/meta-data`` bytes -> the signed manifest bytes, or a clear refusal.

    Nothing here is trusted: this only unwraps, and `verify_manifest` then judges the bytes.
    """
    if len(data) > MAX_META_DATA_BYTES:
        raise ManifestTooLarge(
            f"artifact meta-data is larger than {MAX_META_DATA_BYTES} bytes; an otacast "
            "manifest never is"
        )
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: hostile nesting depth
        raise MalformedManifest("artifact meta-data is not JSON") from None
    if document is None:  # mender-artifact writes `null` when no -m was given
        raise MalformedManifest(
            "artifact has no meta-data: it was not made by `otacast-signer mender-artifact`"
        )
    if not isinstance(document, dict):
        raise MalformedManifest("artifact meta-data is not a JSON object")
    if META_DATA_KEY not in document:
        raise MalformedManifest(f"artifact meta-data has no {META_DATA_KEY!r}")
    extra = sorted(set(document) - {META_DATA_KEY})
    if extra:
        # Nothing else in the meta-data would be acted on; refuse rather than let a publisher
        # believe it was.
        raise MalformedManifest(f"artifact meta-data has unexpected keys: {', '.join(extra)}")
    encoded = document[META_DATA_KEY]
    if not isinstance(encoded, str):
        raise MalformedManifest(f"artifact meta-data {META_DATA_KEY!r} is not a string")
    if len(encoded) > MAX_BASE64_CHARS:
        raise ManifestTooLarge(f"the manifest in the meta-data exceeds {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedManifest(f"artifact meta-data {META_DATA_KEY!r} is not base64") from None
    if not manifest:
        raise MalformedManifest(f"artifact meta-data {META_DATA_KEY!r} is empty")
    return manifest


# --- Mender's file tree ---------------------------------------------------------------------


class Tree:
    """The directory Mender passes as FILE_TREE (read-only for us)."""

    def __init__(self, path: Path) -> None:
        if not path.is_absolute() or not path.is_dir():
            raise UsageError(f"{path} is not a Mender file tree (an absolute directory path)")
        self.path = path

    def read(self, name: str, limit: int) -> bytes:
        data = read_limited(self.path / name, limit, "Mender's")
        if len(data) > limit:
            raise ReadError(f"Mender's {self.path / name} is larger than {limit} bytes")
        return data

    def line(self, name: str) -> str:
        try:
            return self.read(name, MAX_TREE_FILE_BYTES).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ReadError(f"Mender's {self.path / name} is not UTF-8 text") from None

    def meta_data(self) -> bytes:
        """Up to one byte more than allowed: `decode_meta_data` refuses oversize as such."""
        return read_limited(self.path / "header/meta-data", MAX_META_DATA_BYTES, "Mender's")

    @cached_property
    def artifact_name(self) -> str:
        return self.line("header/artifact_name")

    @cached_property
    def device_type(self) -> str | None:
        """Mender's own idea of this device's type (its ``device_type`` file)."""
        if not (self.path / "current_device_type").exists():
            return None
        return self.line("current_device_type") or None


# --- The module's record of the deployment in progress --------------------------------------


@dataclass(frozen=True)
class Deployment:
    """``STATE_DIR/mender/state.json``: written once the image is staged, then by later states."""

    artifact_name: str
    sequence: int
    verified_at: float  # when Download verified the manifest (expiry is judged then, once)
    installer: str | None = None  # the spec that installed it: rollback/commit use the same one
    result: str | None = None  # the installer's status once installed: installed | needs-reboot
    can_roll_back: bool = False  # whether the installer kept something to restore

    @property
    def installed(self) -> bool:
        return self.result is not None


def read_deployment(path: Path) -> Deployment | None:
    """The record, None if there is none; a damaged one is an error (it steers rollback)."""
    if not path.exists():
        return None
    data = read_limited(path, MAX_STATE_BYTES, "module state")
    try:
        deployment = Deployment(**json.loads(data))
    except (ValueError, TypeError, RecursionError):
        raise StateError(f"{path} is not a module state record; remove it") from None
    if not (
        len(data) <= MAX_STATE_BYTES
        and isinstance(deployment.artifact_name, str)
        and isinstance(deployment.sequence, int)
        and not isinstance(deployment.sequence, bool)
        and isinstance(deployment.verified_at, int | float)
        and (deployment.installer is None or isinstance(deployment.installer, str))
        and (deployment.result is None or deployment.result in INSTALLED_STATUSES)
        and isinstance(deployment.can_roll_back, bool)
    ):
        raise StateError(f"{path} is not a module state record; remove it")
    return deployment


def write_deployment(path: Path, deployment: Deployment) -> None:
    data = (json.dumps(asdict(deployment), sort_keys=True) + "\n").encode()
    write_durably(path, data, "the deployment state")


# --- Installer capabilities -------------------------------------------------------------------


def supports_rollback(installer: Installer, deployment: Deployment | None) -> bool:
    """Whether ArtifactRollback could restore what was there before this deployment.

    Only the file installer keeps the previous content.  Before the install, that takes an
    existing target (a first install has nothing to go back to); after it, what the install
    recorded.
    """
    if deployment is not None and deployment.installed:
        return deployment.can_roll_back
    return isinstance(installer, FileInstaller) and installer.target.is_file()


def reboot_answer(deployment: Deployment | None) -> str:
    """NeedsArtifactReboot: ``Automatic`` lets Mender reboot after the install.

    (``Yes`` would make Mender call ArtifactReboot and expect this module to reboot the device
    itself; Mender recommends ``Automatic`` so that several payloads can share one reboot.)
    """
    return "Automatic" if deployment and deployment.result == "needs-reboot" else "No"


# --- States ---------------------------------------------------------------------------------


class Module:
    """One invocation: a state on a file tree, with the device config read when first needed."""

    def __init__(self, tree: Path, out: TextIO) -> None:
        self.tree_path = tree
        self.out = out

    @cached_property
    def tree(self) -> Tree:
        return Tree(self.tree_path)

    @cached_property
    def settings(self) -> Settings:
        return settle(load_config(None), {})

    @property
    def staging(self) -> Path:
        return self.settings.state_dir / STAGING_DIR

    @cached_property
    def trust(self) -> TrustSet:
        # The trust in force: the last rotation accepted by `otacast trust update`, else the
        # config's keys.
        return current_trust(self.settings.state_dir, self.settings.trust, self.settings.threshold)[
            0
        ]

    @cached_property
    def status(self) -> StatusFile:
        return StatusFile(self.settings.state_dir)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def installer(self, spec: str | None = None) -> Installer:
        spec = spec or self.settings.installer
        if spec is None:
            raise UsageError(
                'no installer: set installer = "KIND:ARGUMENT" in the device config '
                f"({self.settings.config or 'none found'})"
            )
        installer = get_installer(spec)
        if isinstance(installer, FileInstaller) and installer.target.resolve().is_relative_to(
            self.staging.resolve()
        ):
            raise UsageError(f"the file installer's target must lie outside {self.staging}")
        return installer

    def deployment(self) -> Deployment | None:
        return read_deployment(self.staging / STATE)

    def current_deployment(self) -> Deployment:
        """The deployment staged for the artifact Mender is working on."""
        deployment = self.deployment()
        if deployment is None:
            raise StateError(f"nothing was downloaded for this artifact ({self.staging} is empty)")
        if deployment.artifact_name != self.tree.artifact_name:
            raise StateError(
                f"{self.staging} holds artifact {deployment.artifact_name!r}, not "
                f"{self.tree.artifact_name!r}"
            )
        return deployment

    def installed_sequence(self) -> int | None:
        """The anti-rollback floor: the sequence otacast last recorded as installed."""
        installed = read_installed(self.settings.state_dir)
        return installed.sequence if installed else None

    def verify(self, data: bytes, *, now: float) -> VerifiedManifest:
        """The device's checks, with this device's type from the config and from Mender."""
        settings = self.settings
        mender_type = self.tree.device_type
        verified = verify_manifest(
            data,
            self.trust,
            now=now,
            device_type=settings.device_type or mender_type,
            installed_sequence=self.installed_sequence(),
        )
        compatible = verified.manifest.compatible
        for source, device_type in (("config", settings.device_type), ("Mender", mender_type)):
            if device_type is not None and device_type not in compatible:
                raise WrongDevice(
                    f"device type {device_type!r} (from {source}) is not among "
                    f"{', '.join(compatible)}"
                )
        return verified

    def reverify(self, deployment: Deployment) -> VerifiedManifest:
        data = read_limited(self.staging / MANIFEST, MAX_MANIFEST_BYTES, "staged manifest")
        verified = self.verify(data, now=deployment.verified_at)
        if verified.manifest.sequence != deployment.sequence:
            raise StateError(f"{self.staging / MANIFEST} does not match {self.staging / STATE}")
        return verified

    def clear_staging(self) -> None:
        try:
            shutil.rmtree(self.staging)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"cannot remove {self.staging}: {exc.strerror or exc}") from None

    # Mender's states ---------------------------------------------------------------------

    def download(self) -> None:
        manifest = decode_meta_data(self.tree.meta_data())
        self.installer()  # a device that cannot install must not download first
        now = time.time()
        verified = self.verify(manifest, now=now)
        # Left-overs of a deployment Mender abandoned without Cleanup (power loss) go first.
        self.clear_staging()
        try:
            self.staging.mkdir(parents=True)
        except OSError as exc:
            raise StateError(f"cannot create {self.staging}: {exc.strerror or exc}") from None
        options = FetchOptions.from_settings(
            replace(self.settings, out=self.staging / IMAGE),
            self.trust,
            manifest=verified,
            installed_sequence=self.installed_sequence(),
            status=self.status,
        )
        fetch(options, self.out)
        write_durably(self.staging / MANIFEST, manifest, "the staged manifest")
        # Written last: its presence says the image and manifest beside it are complete.
        write_deployment(
            self.staging / STATE,
            Deployment(self.tree.artifact_name, verified.manifest.sequence, verified_at=now),
        )
        self.status.update(activity="idle")

    def artifact_install(self) -> None:
        deployment = self.current_deployment()
        verified = self.reverify(deployment)
        image = self.staging / IMAGE
        check_image(image, verified)
        installer = self.installer()
        m = verified.manifest
        self.status.update(
            activity="installing", release=f"{m.name} {m.version}", sequence=m.sequence
        )
        result = installer.install(image, verified)
        if result.status not in INSTALLED_STATUSES:
            raise InstallError(f"installer reported {result.status!r}")
        can_roll_back = isinstance(installer, FileInstaller) and installer.previous.is_file()
        write_deployment(
            self.staging / STATE,
            replace(
                deployment,
                installer=self.settings.installer,
                result=result.status,
                can_roll_back=can_roll_back,
            ),
        )
        self.status.update(activity="idle")
        self.say(
            f"installed {m.name} {m.version} (sequence {m.sequence}): {result.status}"
            + (f"; {result.detail}" if result.detail else "")
        )

    def artifact_commit(self) -> None:
        deployment = self.current_deployment()
        if not deployment.installed:
            raise StateError(f"artifact {deployment.artifact_name} was not installed; no commit")
        verified = self.reverify(deployment)
        assert deployment.result is not None
        self.installer(deployment.installer).commit()
        record = write_installed(self.settings.state_dir, verified, deployment.result)
        self.status.succeeded()
        self.say(f"committed {record.name} {record.version} (sequence {record.sequence})")

    def artifact_rollback(self) -> None:
        deployment = self.deployment()
        if deployment is None or not deployment.installed:
            self.say("nothing was installed: nothing to roll back")
            return
        self.installer(deployment.installer).rollback()
        write_deployment(self.staging / STATE, replace(deployment, result=None))
        self.say(f"rolled back artifact {deployment.artifact_name}")

    def cleanup(self) -> None:
        self.clear_staging()

    def artifact_failure(self) -> None:
        # Mender goes on to Cleanup whatever this state answers: tidy up, report, never fail.
        try:
            self.clear_staging()
        except OtacastError as exc:
            print(f"{PROG}: warning: {exc}", file=sys.stderr)

    def supports_rollback(self) -> str:
        deployment = self.deployment()
        spec = deployment.installer if deployment and deployment.installed else None
        return "Yes" if supports_rollback(self.installer(spec), deployment) else "No"

    def needs_artifact_reboot(self) -> str:
        return reboot_answer(self.deployment())


def check_image(image: Path, verified: VerifiedManifest) -> None:
    """The staged image crossed a process boundary since Download checked it: check it again."""
    m = verified.manifest
    digest = hashlib.sha256()
    length = 0
    try:
        with image.open("rb") as handle:
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
                length += len(block)
                if length > m.image.length:
                    break
    except OSError as exc:
        raise StateError(f"cannot read staged image {image}: {exc.strerror or exc}") from None
    if length != m.image.length or digest.digest() != m.image.sha256:
        raise ImageMismatch(f"staged image {image} does not match the manifest; download again")


# Mender's state name -> what it does; a query's answer is printed (nothing else may be).
_ACTIONS: dict[str, Callable[[Module], None]] = {
    "Download": Module.download,
    "ArtifactInstall": Module.artifact_install,
    "ArtifactCommit": Module.artifact_commit,
    "ArtifactRollback": Module.artifact_rollback,
    "Cleanup": Module.cleanup,
    "ArtifactFailure": Module.artifact_failure,
}
_QUERIES: dict[str, Callable[[Module], str]] = {
    "SupportsRollback": Module.supports_rollback,
    "NeedsArtifactReboot": Module.needs_artifact_reboot,
}
STATES = frozenset(_ACTIONS) | frozenset(_QUERIES)


def run_state(state: str, tree: Path, out: TextIO) -> None:
    """Carry out one of Mender's states; unknown states do nothing, as the protocol asks."""
    if state not in STATES:
        return
    module = Module(tree, out)
    query = _QUERIES.get(state)
    if query is not None:
        out.write(query(module) + "\n")  # stdout is the answer: nothing else may go there
        out.flush()
        return
    try:
        _ACTIONS[state](module)
    except OtacastError as exc:
        with contextlib.suppress(OtacastError):
            module.status.failed(f"Mender {state}: {type(exc).__name__}: {exc}")
        raise


# --- Installing the module into Mender ------------------------------------------------------


def install_module(modules_dir: Path, executable: Path) -> str:
    """Link `executable` as Mender's ``otacast`` module; idempotent."""
    if not modules_dir.is_dir():
        raise UsageError(f"{modules_dir} does not exist: is mender-client installed?")
    link = modules_dir / PAYLOAD_TYPE
    if link.is_symlink():
        if link.readlink() == executable:
            return f"{link} already points to {executable}"
    elif link.exists():
        raise UsageError(f"{link} exists and is not a link; remove it to install this module")
    tmp = modules_dir / f".{PAYLOAD_TYPE}.{os.getpid()}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(executable)
        tmp.replace(link)  # atomic: Mender never sees the module missing
    except PermissionError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"cannot write {modules_dir}: permission denied (run as root)") from None
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StateError(f"cannot link {link}: {exc.strerror or exc}") from None
    return f"linked {link} -> {executable}"


def own_executable() -> Path:
    """This program's installed command, as Mender must run it (not `python -m ...`)."""
    candidate = Path(sys.argv[0]).resolve()
    if candidate.name == PROG and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(PROG)
    if found is None:
        raise UsageError(f"cannot find the {PROG} command; run the installed {PROG}")
    return Path(found).resolve()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="otacast's Mender update module (payload type otacast). Mender runs it as "
        f"`{PROG} STATE FILE_TREE`; run `{PROG} --install-module` once, as root, to make it "
        "known to Mender.",
    )
    parser.add_argument("state", nargs="?", help="the Mender state (Download, ArtifactInstall ...)")
    parser.add_argument("tree", nargs="?", type=Path, help="Mender's file tree for the payload")
    parser.add_argument(
        "--install-module",
        action="store_true",
        help=f"link this program as {MODULES_DIR / PAYLOAD_TYPE} (idempotent; needs root)",
    )
    parser.add_argument(
        "--modules-dir",
        type=Path,
        help=f"Mender's update module directory (default {MODULES_DIR})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.install_module:
            if args.state is not None:
                raise UsageError("--install-module takes no STATE or FILE_TREE")
            if args.modules_dir is None and os.geteuid() != 0:
                raise UsageError(f"--install-module must run as root (it writes {MODULES_DIR})")
            print(install_module(args.modules_dir or MODULES_DIR, own_executable()))
            return 0
        if args.state is None or args.tree is None or args.modules_dir is not None:
            raise UsageError(f"usage: {PROG} STATE FILE_TREE, or {PROG} --install-module")
        run_state(args.state, args.tree, sys.stdout)
        return 0
    except OtacastError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
