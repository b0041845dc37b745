"""The ``otacast`` commands, one module each (``fetch``, ``install`` and ``watch`` share
`receiving`); each command's sub-parser is registered next to its ``cmd_`` function, and
`otacast.plugin.cli` puts them together."""
