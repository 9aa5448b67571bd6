"""scarches-fl's trust layer: formats, signatures, the ledger and its verification.

No torch, no grpc at import time; the verification core (``canonical``, ``bundle``, ``diff``,
``dsse``, ``policy``, ``update``, ``ledger``, ``merkle``, ``checkpoint``) takes bytes and trusted
state and does no I/O. Import the submodules directly:

* :mod:`protocols.canonical` -- canonical JSON (RFC 8785 subset) and the strict parser
* :mod:`protocols.bundle` -- reference bundles and their RFC 6962 content digest
* :mod:`protocols.diff` -- condition diffs: extract, apply, strict (de)serialization
* :mod:`protocols.keys` -- Ed25519 keys, key ids, key files
* :mod:`protocols.dsse` -- DSSE v1 envelopes with thresholds
* :mod:`protocols.policy` -- the trust policy and ``trust.json``
* :mod:`protocols.update` -- signed site updates and their pure validation
* :mod:`protocols.ledger` -- ledger entry kinds, :class:`~protocols.ledger.LedgerState` replay, receipts
* :mod:`protocols.merkle`, :mod:`protocols.checkpoint` -- the Merkle log, C2SP checkpoints
* :mod:`protocols.errors` -- the typed error tree and the reason code registry
* :mod:`protocols.limits` -- every size limit in one dataclass

The byte-level specification is ``docs/protocol.md``.
"""

__all__ = [
    "bundle",
    "canonical",
    "checkpoint",
    "diff",
    "dsse",
    "errors",
    "keys",
    "ledger",
    "limits",
    "merkle",
    "policy",
    "update",
]
