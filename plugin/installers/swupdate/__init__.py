"""The SWUpdate installers and the IPC protocol they speak.

``swupdate:DIR`` (`installer.SwupdateIpcInstaller`) streams the verified ``.swu`` into a running
swupdate daemon; ``swupdate-run:ARGS`` (`run.SwupdateRunInstaller`) starts a private daemon for
one install and does the same through its sockets.  `ipc` holds SWUpdate's message layouts (the
one device module that uses construct: the protocol lives where it is used).
"""

from .installer import SwupdateIpcInstaller
from .run import SwupdateRunInstaller

__all__ = ["SwupdateIpcInstaller", "SwupdateRunInstaller"]
