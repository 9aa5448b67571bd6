"""The typed error tree of scarches-fl's trust layer.

Two roots, as in python-tuf and sigstore:

* :class:`VerificationError` -- the bytes were received but are not acceptable: bad signature,
  inconsistent checkpoint, malformed update, wrong digest. Never retry these: something is wrong
  with what was sent.
* :class:`TransportError` -- the bytes never arrived intact: connection refused, deadline,
  oversized stream. Retrying may help.

Every error raised by the libraries underneath (``cryptography``, ``json``, ``safetensors``,
``binascii``, ``grpc``) is caught at the boundary and re-raised as one of these, ``from`` the
cause.

Every :class:`VerificationError` carries a stable reason code (``err.reason_code``, a string
such as ``"E_SIG_INVALID"``) from :data:`REASON_CODES`. Codes and their numbers are never reused
or renumbered; a removed code stays listed with ``retired=True``. ``docs/protocol.md`` lists
them all.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ReasonCode",
    "REASON_CODES",
    "reason",
    "ScarchesFLError",
    "VerificationError",
    "TransportError",
    "FormatError",
    "ConfigError",
    "OversizeError",
    "CanonicalJSONError",
    "SafetensorsFormatError",
    "BundleError",
    "DigestMismatchError",
    "KeyFormatError",
    "EnvelopeFormatError",
    "SignatureError",
    "PolicyError",
    "UpdateRejectedError",
    "LedgerError",
    "ReceiptError",
    "ProofError",
    "CheckpointError",
]


@dataclass(frozen=True)
class ReasonCode:
    """One entry of the reason code registry."""

    code: str
    number: int
    help: str
    retired: bool = False


def _registry(*codes: ReasonCode) -> dict[str, ReasonCode]:
    out: dict[str, ReasonCode] = {}
    numbers: set[int] = set()
    for rc in codes:
        if rc.code in out or rc.number in numbers:  # pragma: no cover - guarded by a test too
            raise RuntimeError(f"reason code {rc.code}/{rc.number} registered twice")
        out[rc.code] = rc
        numbers.add(rc.number)
    return out


# Append only. Never change a number, never reuse one; retire instead of deleting.
REASON_CODES: dict[str, ReasonCode] = _registry(
    ReasonCode("E_INTERNAL", 1, "A verifier bug, not the sender's fault; report it."),
    ReasonCode("E_OVERSIZE", 2, "The input exceeds a size limit (protocols.limits.Limits); send less or raise the limit."),
    ReasonCode("E_JSON_MALFORMED", 3, "Not valid JSON (RFC 8259)."),
    ReasonCode("E_JSON_DUPLICATE_KEY", 4, "A JSON object names the same key twice; every key must be unique."),
    ReasonCode("E_JSON_NONFINITE", 5, "NaN, Infinity or an out-of-range number in JSON; only finite numbers are allowed."),
    ReasonCode("E_JSON_TOO_DEEP", 6, "JSON nested deeper than the limit."),
    ReasonCode("E_JSON_NOT_UTF8", 7, "JSON bytes are not strict UTF-8 (or carry a BOM / lone surrogate)."),
    ReasonCode("E_JSON_NOT_CANONICAL", 8, "Signed JSON must be byte-identical to its canonical form (RFC 8785 subset, ADR 0001)."),
    ReasonCode("E_SAFETENSORS_MALFORMED", 9, "The safetensors file is malformed (header, offsets or data)."),
    ReasonCode("E_SAFETENSORS_HEADER_OVERSIZE", 10, "The safetensors header length exceeds the limit."),
    ReasonCode("E_DTYPE_NOT_ALLOWED", 11, "A tensor dtype outside the allowed set."),
    ReasonCode("E_BUNDLE_INVALID", 12, "The bundle's manifest or tensors are inconsistent or malformed."),
    ReasonCode("E_DIGEST_MISMATCH", 13, "The content digest does not match the bundle's contents."),
    ReasonCode("E_KEY_MALFORMED", 14, "A key file or key text does not parse as an Ed25519 key."),
    ReasonCode("E_ENVELOPE_MALFORMED", 15, "The DSSE envelope is malformed."),
    ReasonCode("E_PAYLOAD_TYPE", 16, "The DSSE payloadType is not the one expected here."),
    ReasonCode("E_SIG_INVALID", 17, "A signature does not verify under the named key."),
    ReasonCode("E_SIG_THRESHOLD", 18, "Fewer distinct trusted keys signed than the policy requires."),
    ReasonCode("E_KEY_UNKNOWN", 19, "The signing key is not enrolled in the trust policy."),
    ReasonCode("E_KEY_REVOKED", 20, "The signing key was revoked."),
    ReasonCode("E_KEY_ROTATED", 21, "The signing key was rotated out; sign with the site's current key."),
    ReasonCode("E_PAYLOAD_MALFORMED", 22, "The signed payload's fields are missing, extra or of the wrong type."),
    ReasonCode("E_ORIGIN_MISMATCH", 23, "The payload names another log origin."),
    ReasonCode("E_SITE_MISMATCH", 24, "The payload's site id or key id does not match the signing key."),
    ReasonCode("E_SEQUENCE_REPLAY", 25, "The per-site sequence number is not greater than the last accepted one."),
    ReasonCode("E_BASE_UNKNOWN", 26, "The base checkpoint (size, root) is not a checkpoint of this log."),
    ReasonCode("E_BASE_DIGEST_MISMATCH", 27, "The base model digest is not the reference version at the base size."),
    ReasonCode("E_CONDITION_NAME", 28, "A condition name is not of the form <namespace>/<batch> in ASCII."),
    ReasonCode("E_CONDITION_NAMESPACE", 29, "A condition name lies outside the submitting site's namespace."),
    ReasonCode("E_CONDITION_EXISTS", 30, "A condition name already exists in the reference (or repeats)."),
    ReasonCode("E_DIFF_SHA256_MISMATCH", 31, "The diff bytes do not hash to the signed diff sha256."),
    ReasonCode("E_DIFF_SIZE_MISMATCH", 32, "The diff byte length differs from the signed size."),
    ReasonCode("E_TENSOR_SET", 33, "The diff's tensor names differ from the base's condition tensors."),
    ReasonCode("E_TENSOR_FROZEN", 34, "The diff carries a tensor whose role is frozen."),
    ReasonCode("E_TENSOR_SHAPE", 35, "A diff tensor's shape is not the one implied by the base and the new conditions."),
    ReasonCode("E_TENSOR_DTYPE", 36, "A diff tensor's dtype differs from the base tensor's."),
    ReasonCode("E_NONFINITE", 37, "A tensor holds NaN or Inf."),
    ReasonCode("E_NORM_LIMIT", 38, "A tensor's values or L2 norm exceed the policy limits."),
    ReasonCode("E_STATS_MISMATCH", 39, "The signed summary statistics or tensor list do not match the diff."),
    ReasonCode("E_POLICY_INVALID", 40, "The trust policy is malformed or inconsistent."),
    ReasonCode("E_POLICY_CHANGE", 41, "A policy change is not allowed (unknown site, bad rotation, ...)."),
    ReasonCode("E_SITE_NOT_ENROLLED", 42, "The site id is not enrolled."),
    ReasonCode("E_ROTATION_SIGNATURES", 43, "A key rotation needs signatures by both the old and the new site key."),
    ReasonCode("E_LEDGER_ENTRY_KIND", 44, "Unknown ledger entry kind or payload type."),
    ReasonCode("E_LEDGER_ORDER", 45, "Entry out of order (e.g. genesis not first, or a second genesis)."),
    ReasonCode("E_BLOB_MISSING", 46, "A blob the entry names is not available."),
    ReasonCode("E_BLOB_MISMATCH", 47, "A blob's bytes do not hash to the sha256 that names it."),
    ReasonCode("E_RECEIPT_INVALID", 48, "A receipt is malformed or does not verify."),
    ReasonCode("E_PROOF_INVALID", 49, "A Merkle inclusion or consistency proof does not verify."),
    ReasonCode("E_CHECKPOINT_INVALID", 50, "A checkpoint or signed note is malformed or not signed by the pinned key."),
    ReasonCode("E_CHECKPOINT_ROLLBACK", 51, "A checkpoint is older than, or forks from, the last verified one."),
    ReasonCode("E_FEDERATED_ROUND", 52, "A federated round entry is inconsistent (contributors, digests)."),
    ReasonCode("E_BASE_STALE", 53, "The base is older than the last change of the shared weights (genesis or federated round); map again on the current reference."),
    ReasonCode("E_TOO_MANY_CONDITIONS", 54, "The update adds more conditions than the policy allows in one update."),
    ReasonCode("E_RATE_LIMITED", 55, "The site submitted faster than the coordinator's per-site rate limit allows; wait retry_after_s and resubmit the same signed update (idempotent)."),
    ReasonCode("E_CONDITION_CAP", 56, "The update would take the reference, or the site, over the operator's cap on total conditions (limits.max_conditions_per_reference / max_conditions_per_site)."),
    ReasonCode("E_LABEL_BELOW_K", 57, "A label prototype's cell count is below the label policy's k, or not rounded down to its count bucket; types with fewer cells never leave a site."),
    ReasonCode("E_LABEL_LATENT_DIM", 58, "A label prototype's dimension is not the reference's latent dimension; compute it on the reference you mapped on."),
    ReasonCode("E_LABEL_VOCABULARY", 59, "A contributed type name escapes the vocabulary rules (a ':' namespace, a reserved or unprintable name, a repeat); send the site's own plain names."),
    ReasonCode("E_LABEL_DP_WEAK", 60, "The contribution's privacy mechanism or parameters are weaker than the label policy requires (epsilon, delta, clip norm, noise, released spread)."),
    ReasonCode("E_LABEL_LEVEL", 61, "The label level is not one the reference carries prototypes for; contribute to one of its levels."),
    ReasonCode("E_LABEL_POLICY", 62, "A label policy entry is malformed or not allowed (accepting a name already in the vocabulary, mapping onto an unknown type, ...)."),
    ReasonCode("E_LABEL_EXPRESSION", 63, "A label prototype's expression part does not fit the reference: the level has no expression prototypes, or the dimension is not its expression subspace's; compute it on the reference you mapped on."),
    ReasonCode("E_LABEL_POLICY_SITE_UNKNOWN", 68, "A label policy accept or map names a site type '<site>:<name>' of a site the trust policy does not know (never enrolled); only an enrolled site's contributed names can be decided."),
    ReasonCode("E_LABEL_POLICY_NOT_CONTRIBUTED", 69, "A label policy accept or map names a site type that no contribution of that site on the current reference brought (or that already matched the vocabulary); decide a name after its contribution is in the ledger (`coordinator label-policy show` lists the pending ones)."),
    ReasonCode("E_LABEL_SHARE_MINIMUM", 64, "A federated label share holds a sum over fewer of one site's cells (a type, a batch, or all of them) than the federation's per-site minimum; a group that small never leaves a site."),
    ReasonCode("E_FEDERATED_LABELS", 65, "A federated_labels entry does not label the ledger's current federated head (it must directly follow the federated_round it names, on that round's aggregate, once), or its label knowledge does not fit that aggregate; publish the run's label knowledge right after its final round (`federate publish`)."),
)


def reason(code: str) -> ReasonCode:
    """The registry entry for ``code``; ``KeyError`` for an unknown code (a bug)."""
    return REASON_CODES[code]


class ScarchesFLError(Exception):
    """Root of every error this project raises on purpose. The CLI prints these without a
    traceback (``user_message``) and exits with ``exit_code``."""

    user_message = True
    exit_code = 1


class VerificationError(ScarchesFLError):
    """What was received is not acceptable. Do not retry.

    ``reason_code`` is a stable string from :data:`REASON_CODES`; subclasses set a default and
    callers may pass a more precise one.
    """

    exit_code = 3
    default_reason_code = "E_INTERNAL"

    def __init__(self, message: str = "", *, reason_code: str | None = None) -> None:
        code = reason_code or self.default_reason_code
        if code not in REASON_CODES:  # a programming error: fail loudly, but typed
            raise ValueError(f"unregistered reason code {code!r}")
        self.reason_code = code
        self.message = message
        super().__init__(message)


class FormatError(VerificationError):
    """Bytes that do not parse as the format they claim to be (strict parsers raise this)."""

    default_reason_code = "E_JSON_MALFORMED"


class OversizeError(FormatError):
    """Input larger than a limit of :class:`protocols.limits.Limits`; nothing was parsed."""

    default_reason_code = "E_OVERSIZE"


class CanonicalJSONError(FormatError):
    """Strict JSON parsing or canonical encoding failed."""

    default_reason_code = "E_JSON_MALFORMED"


class SafetensorsFormatError(FormatError):
    """A safetensors file (bundle model or diff) is malformed or hostile."""

    default_reason_code = "E_SAFETENSORS_MALFORMED"


class BundleError(VerificationError):
    """A model bundle is missing, malformed or inconsistent with its manifest."""

    default_reason_code = "E_BUNDLE_INVALID"


class DigestMismatchError(BundleError):
    """A bundle's content digest does not match its contents."""

    default_reason_code = "E_DIGEST_MISMATCH"


class KeyFormatError(FormatError):
    """A key file or key text is not an Ed25519 key in the expected encoding."""

    default_reason_code = "E_KEY_MALFORMED"


class EnvelopeFormatError(FormatError):
    """A DSSE envelope does not parse."""

    default_reason_code = "E_ENVELOPE_MALFORMED"


class SignatureError(VerificationError):
    """Signatures do not verify, or too few trusted keys signed."""

    default_reason_code = "E_SIG_INVALID"


class PolicyError(VerificationError):
    """The trust policy (trust.json, or a policy ledger entry) is malformed or not allowed."""

    default_reason_code = "E_POLICY_INVALID"


class UpdateRejectedError(VerificationError):
    """A site update is rejected; ``reason_code`` says why (stable), the message says how to fix."""

    default_reason_code = "E_PAYLOAD_MALFORMED"

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message, reason_code=reason_code)

    def __str__(self) -> str:
        return f"{self.message} [{self.reason_code}]"


class LedgerError(VerificationError):
    """A ledger entry is malformed, out of order, or names blobs that do not match."""

    default_reason_code = "E_LEDGER_ENTRY_KIND"


class ReceiptError(VerificationError):
    """A receipt is malformed or its proof does not verify."""

    default_reason_code = "E_RECEIPT_INVALID"


class ProofError(VerificationError):
    """A Merkle proof does not verify."""

    default_reason_code = "E_PROOF_INVALID"


class CheckpointError(VerificationError):
    """A checkpoint / signed note is malformed or not signed by the pinned key."""

    default_reason_code = "E_CHECKPOINT_INVALID"


class TransportError(ScarchesFLError):
    """What was asked for did not arrive intact. Retrying may help."""

    exit_code = 4


class ConfigError(ScarchesFLError):
    """A configuration file or flag is wrong; the message names the file and the field."""

    exit_code = 2
