"""python -m genloss.registry notes/API.md: regenerate the op table of the API notes."""

import sys

from . import write_api

write_api(sys.argv[1])
