import sys

from distill.cli import script

sys.exit(script())
