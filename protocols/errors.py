"""The typed error tree of scarches-fl's trust layer.

Two roots, as in python-tuf and sigstore:

* :class:`VerificationError` -- the bytes were received but are not acceptable: bad signature,
  inconsistent checkpoint, malformed update, wrong digest. Never retry these: something is wrong
  with what was sent.
* :class:`TransportError` -- the bytes never arrived intact: connection refused, deadline,
  oversized stream. Retrying may help.

Every error raised by the libraries underneath (``cryptography``, ``json``, ``safetensors``,
``grpc``) is caught at the boundary and re-raised as one of these, ``from`` the cause.

Every rejection of an update carries a stable :class:`ReasonCode` (see ``REASON_CODES``); codes
are never reused or renumbered, removed codes stay listed as retired.
"""

from __future__ import annotations

__all__ = [
    "ScarchesFLError",
    "VerificationError",
    "TransportError",
    "FormatError",
    "ConfigError",
]


class ScarchesFLError(Exception):
    """Root of every error this project raises on purpose. The CLI prints these without a
    traceback (``user_message``) and exits with ``exit_code``."""

    user_message = True
    exit_code = 1


class VerificationError(ScarchesFLError):
    """What was received is not acceptable. Do not retry."""

    exit_code = 3


class FormatError(VerificationError):
    """Bytes that do not parse as the format they claim to be (strict parsers raise this)."""


class TransportError(ScarchesFLError):
    """What was asked for did not arrive intact. Retrying may help."""

    exit_code = 4


class ConfigError(ScarchesFLError):
    """A configuration file or flag is wrong; the message names the file and the field."""

    exit_code = 2
