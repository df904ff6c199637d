"""The one-line notes picogpt prints on stderr."""

import sys


def warn(message):
    print(f"picogpt: {message}", file=sys.stderr, flush=True)
