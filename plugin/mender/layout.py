"""The Mender module's names and limits, in one place so its other modules share them.

The payload type and meta-data key must match what the publisher's ``otacast-signer
mender-artifact`` writes; the staging names are files under ``STATE_DIR/mender/`` that one state
leaves for the next (package doc).
"""

from __future__ import annotations

from pathlib import Path

from otacast.schemas.limits import MAX_MANIFEST_BYTES

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
