"""`python -m picogpt ...` is the `picogpt` command."""

from .cli import entry

entry()
