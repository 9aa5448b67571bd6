"""Size limits for everything the trust layer reads from outside, declared in one place.

Every parser in ``protocols`` checks the byte length of its input against one of these limits
*before* it parses anything, so that a hostile peer cannot make a verifier allocate or loop in
proportion to a number it chose. The defaults fit the models this project builds (a reference of
a few thousand genes and a few hundred conditions is a few MiB; a site's diff is kilobytes).

Operators who need larger limits build their own :class:`Limits` and pass it explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "DEFAULT_LIMITS"]

_KiB = 1024
_MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Upper bounds, in bytes unless named otherwise."""

    #: canonical / strict JSON: the default cap of :func:`protocols.canonical.parse_json_strict`
    max_json_bytes: int = 4 * _MiB
    #: nesting depth of any JSON document (objects + arrays)
    max_json_depth: int = 32
    #: a bundle's manifest.json
    max_manifest_bytes: int = 16 * _MiB
    #: a bundle's model.safetensors
    max_model_bytes: int = 2048 * _MiB
    #: the JSON header inside any safetensors file
    max_safetensors_header_bytes: int = 1 * _MiB
    #: tensors in one safetensors file
    max_tensors: int = 4096
    #: dimensions of one tensor
    max_ndim: int = 8
    #: one dimension of one tensor
    max_dim: int = 2**31 - 1
    #: a site's diff.safetensors
    max_diff_bytes: int = 16 * _MiB
    #: a DSSE envelope (site update, policy entry, genesis, federated round)
    max_envelope_bytes: int = 1 * _MiB
    #: the decoded payload inside a DSSE envelope
    max_payload_bytes: int = 512 * _KiB
    #: signatures in one DSSE envelope
    max_signatures: int = 32
    #: new conditions in one site update
    max_new_conditions: int = 1024
    #: a trust.json file
    max_trust_bytes: int = 1 * _MiB


DEFAULT_LIMITS = Limits()
