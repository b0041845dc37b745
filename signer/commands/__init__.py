"""The ``otacast-signer`` commands, one module per group; each command's sub-parser is
registered next to its ``cmd_`` function (`otacast.signer.cli` puts them together)."""
