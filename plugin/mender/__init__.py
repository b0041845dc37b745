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
  final target (Mender's rule: nothing is installed in Download).  With nothing heard and no
  mirror to fall back on, Download fails after the join timeout (`FetchOptions`'
  ``give_up_without_fallback``) rather than at Mender's module timeout, hours later.
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

Where things live: `layout` (names and limits), `meta` (the artifact's meta-data and Mender's
file tree, untrusted), `deployment` (the module's record of the deployment in progress and what
the queries answer from it), `module` (the states), `main` (the command line and
``--install-module``).  The install itself is `otacast.plugin.deliver`'s, shared with ``otacast
install`` and ``watch``.
"""
