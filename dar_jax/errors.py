"""The base of dar-jax's clear errors: bad input, files, configs and requests the package refuses
with a message naming the problem. Every such error subclasses :class:`DarError` (and, where it
did before, ValueError); the command lines print it and exit with status 2."""
from __future__ import annotations


class DarError(Exception):
    """An error dar-jax raises on purpose, with a message that names the problem and the fix."""
