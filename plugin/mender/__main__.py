"""``python -m otacast.plugin.mender``: the Mender update module, as the installed executable."""

import sys

from .main import main

sys.exit(main())
