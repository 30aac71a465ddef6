import sys

from ..cli import entry

sys.exit(entry(["demo", *sys.argv[1:]]))
