"""Label knowledge that grows through the ledger: label contributions, the label policy, and the
replay that turns them into the label knowledge of a reference version.

Two entry kinds (ADR 0044):

=======================  =============================================================  ============
kind                     payloadType                                                    signed by
=======================  =============================================================  ============
``label_contribution``   ``application/vnd.scarches-fl.label-contribution.v1+json``     the site's key
``label_policy``         ``application/vnd.scarches-fl.label-policy.v1+json``           operator threshold
=======================  =============================================================  ============

A **label contribution** carries, for one label level (``label_key``) of the reference, one
prototype per cell type the site annotated: the mean of its cells' latent coordinates, their
per-dimension spread (absent under differential privacy), and the number of cells rounded down
to the policy's count bucket. Nothing per cell. Payload (canonical JSON, exactly these fields)::

    {"kind": "label_contribution", "format_version": 1, "origin": <log origin>,
     "site_id": <site id>, "key_id": <hex sha256 of the site key>, "sequence": <int >= 1>,
     "base": {"size": <int >= 1>, "root": <hex>, "digest": "sha256:<hex>"},
     "label_key": <label level of the reference>, "n_latent": <int>,
     "privacy": {"mechanism": "none"}
              | {"mechanism": "gaussian", "clip_norm": C, "epsilon": e, "delta": d},
     "prototypes": [{"name": <str>, "count": <int>, "mean": [n_latent floats],
                     "std": [n_latent floats] | null, "sigma": <float >= 0>}, ...]}

``sequence`` shares the site's sequence space with its site updates. Under ``gaussian`` each
mean is the mean of latents clipped to L2 norm ``C`` plus N(0, sigma^2) noise per dimension,
``sigma`` at least :func:`gaussian_sigma` ``(epsilon, delta, 2 C / count)`` (the analytic Gaussian
mechanism of Balle and Wang, 2018: exact for every epsilon; ``2 C / count`` is the L2
sensitivity of a mean of ``count`` or more clipped vectors when one cell is replaced).

**Format version 2** (ADR 0045) adds the same cells' summary in the reference's public
expression subspace (the bundle's ``labels.expression``, ``n_components`` components): the
payload has ``"format_version": 2`` and one more field ``"n_expression": <int>``, and every
prototype one more field ``"expression": {"mean": [n_expression floats], "std": [n_expression
floats] | null, "sigma": <float >= 0>}``. Under ``gaussian`` the privacy object has one more
field ``"expression_clip_norm": C_e`` and the two means of a type are one Gaussian mechanism:
each cell's latent is clipped to ``C`` and its expression scores to ``C_e``, and the noise is
``sigma >= C s`` and ``expression.sigma >= C_e s`` with ``s =`` :func:`joint_noise_scale`
``(epsilon, delta, count, 2)`` (the concatenation of both parts, each divided by its clip
norm, has sensitivity ``2 sqrt(2) / count``). Version 1 payloads stay valid.

A **label policy** entry is operator-signed; ``action`` is one of::

    {"kind": "label_policy", "format_version": 1, "origin": ..., "action": "settings",
     "settings": {"k": 20, "count_bucket": 10, "max_types": 64,
                  "dp": null | {"clip_norm": C, "epsilon": e, "delta": d}}}
    {... "action": "accept", "label_key": L, "name": "<site>:<name>", "as": <shared name>}
    {... "action": "map",    "label_key": L, "name": "<site>:<name>", "to": <vocabulary name>}

Before any ``settings`` entry the policy is :data:`DEFAULT_LABEL_POLICY` (k = 20, bucket 10, at
most 64 types, no DP requirement).

**Vocabulary.** Names match after normalisation (:func:`normalise_name`: whitespace runs become
one space, ends trimmed; matching ignores case). The vocabulary of a level is the reference's own
classes (genesis or federated round) plus every name the operator accepted. A contributed name
in the vocabulary when its entry is accepted is that type; otherwise it is the site's own type
``"<site>:<name>"``, until a ``label_policy`` ``accept`` makes it a shared name or a ``map``
points it at an existing type. So two sites' different meanings of one new name never merge
silently: accepting site A's ``delta`` leaves site B's earlier ``delta`` as ``B:delta`` until it
too is mapped (later contributions named ``delta`` match the shared name).

Rules of :func:`validate_label_contribution` (pure, no I/O, no clock), in order; the first
failure raises :class:`~protocols.errors.UpdateRejectedError` with the code in brackets:

1. envelope <= ``limits.max_envelope_bytes`` [E_OVERSIZE]; parses [E_ENVELOPE_MALFORMED];
   payloadType [E_PAYLOAD_TYPE]; exactly one signature [E_ENVELOPE_MALFORMED];
2. signer: an enrolled site key [E_KEY_UNKNOWN], active [E_KEY_REVOKED, E_KEY_ROTATED], the
   signature verifies [E_SIG_INVALID];
3. payload: canonical JSON with exactly the fields above [E_PAYLOAD_MALFORMED], every number
   finite [E_NONFINITE], origin [E_ORIGIN_MISMATCH], site and key id the signer's
   [E_SITE_MISMATCH];
4. sequence above the site's last accepted one [E_SEQUENCE_REPLAY];
5. base: a checkpoint of this log [E_BASE_UNKNOWN], its reference digest
   [E_BASE_DIGEST_MISMATCH], not before the last genesis / federated round (another latent
   space) [E_BASE_STALE];
6. ``label_key`` is a label level of the reference [E_LABEL_LEVEL];
7. 1 to ``max_types`` prototypes [E_OVERSIZE];
8. ``n_latent`` and every mean / std length equal the reference's latent dimension
   [E_LABEL_LATENT_DIM]; every std > 0; in version 2 the reference carries expression
   prototypes for ``label_key``, ``n_expression`` and every expression mean / std length equal
   its ``n_components`` [E_LABEL_EXPRESSION], every expression std > 0;
9. every name is a plain type name: 1-64 printable characters, no ``:`` (the namespace
   separator: a site cannot name a type into another site's namespace), not ``Unknown`` nor a
   missing-value marker, unique after normalisation and equal to its normalised form
   [E_LABEL_VOCABULARY];
10. every count >= ``k`` and a multiple of ``count_bucket`` [E_LABEL_BELOW_K];
11. privacy at least the policy's: with a ``dp`` requirement the mechanism is ``gaussian``, its
    epsilon <= the policy's, delta <= the policy's, clip norm <= the policy's, every std null and
    every sigma >= ``gaussian_sigma(epsilon, delta, 2 clip_norm / count)`` (version 2: every
    std and expression std null, every sigma >= ``clip_norm s`` and expression sigma >=
    ``expression_clip_norm s`` as above); with ``none`` every sigma is 0 and every std present
    [E_LABEL_DP_WEAK].

Rules of :func:`apply_label_policy` (pure): settings need ``1 <= count_bucket <= k``,
``max_types >= 1`` and DP parameters ``C > 0``, ``epsilon > 0``, ``0 < delta < 1``
[E_LABEL_POLICY]. ``accept`` and ``map`` decide a name that exists (ADR 0046): ``<site>`` is a
site of the trust policy in force [E_LABEL_POLICY_SITE_UNKNOWN]; ``<site>:<name>`` is not
decided yet [E_LABEL_POLICY] and is, exactly, a site type that a contribution of that site on
the current lineage brought (:meth:`LabelLedger.pending_names`) [E_LABEL_POLICY_NOT_CONTRIBUTED];
``accept`` names a shared name not yet in the vocabulary; ``map`` a target in the vocabulary
[E_LABEL_POLICY].

The label knowledge of reference version N (:func:`merge_label_knowledge`) is the reference
bundle's own ``labels`` plus, per level, one prototype per accepted contribution prototype made
on the current lineage before N, named through the vocabulary in force at N. Each carries its
``source`` (``"<site>#<entry index>"``); the bundle's own ones are ``genesis``. Where the level
has expression prototypes, its ``expression`` section also lists ``contributed``: every
contributed expression part in ledger order, its resolved ``label``, ``anchor`` (true where the
reference's expression prototypes already hold that type: such a part only places its site's
frame, it never changes the reference's own type), ``n_cells``, ``mean``, ``std``, ``sigma``,
``source``. How a site labels with them is :func:`scarches_fl.refine.contributed_expression_types`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.bundle import NAMESPACE_RE
from protocols.canonical import canonical_json, parse_json_strict
from protocols.dsse import parse_envelope, sign_envelope, verify_envelope
from protocols.errors import UpdateRejectedError, VerificationError
from protocols.keys import key_id, public_key_from_text
from protocols.limits import DEFAULT_LIMITS, Limits
from protocols.policy import TrustPolicy

__all__ = [
    "LABEL_CONTRIBUTION_TYPE",
    "LABEL_POLICY_TYPE",
    "GENESIS_SOURCE",
    "DPRequirement",
    "LabelPolicy",
    "DEFAULT_LABEL_POLICY",
    "LabelPolicyChange",
    "Prototype",
    "ContributionPayload",
    "LabelContext",
    "AcceptedContribution",
    "AuthenticatedContribution",
    "authenticate_contribution",
    "LabelLedger",
    "normalise_name",
    "name_key",
    "gaussian_sigma",
    "bucket_count",
    "build_contribution_payload",
    "sign_contribution",
    "parse_contribution_payload",
    "validate_label_contribution",
    "parse_label_policy",
    "apply_label_policy",
    "label_policy_entry",
    "resolve_name",
    "merge_label_knowledge",
    "reference_expression_levels",
    "joint_noise_scale",
    "ExpressionPrototype",
]

LABEL_CONTRIBUTION_TYPE = "application/vnd.scarches-fl.label-contribution.v1+json"
LABEL_POLICY_TYPE = "application/vnd.scarches-fl.label-policy.v1+json"
GENESIS_SOURCE = "genesis"
MAX_NAME_CHARS = 64
_RESERVED = {"unknown", "", "nan", "none", "na", "n/a", "unassigned"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_SIGMA_RTOL = 1e-6  # libm differences between machines; sigma is compared with this slack


def _reject(code: str, msg: str) -> UpdateRejectedError:
    return UpdateRejectedError(code, msg)


def _policy_error(msg: str) -> UpdateRejectedError:
    return UpdateRejectedError("E_LABEL_POLICY", msg)


# --------------------------------------------------------------------------------------------
# names


def normalise_name(name: str) -> str:
    """``name`` with every whitespace run one space and the ends trimmed (NFC)."""
    return " ".join(unicodedata.normalize("NFC", str(name)).split())


def name_key(name: str) -> str:
    """What two names must share to be the same type: normalised, case-folded."""
    return normalise_name(name).casefold()


def _check_type_name(name: Any, what: str) -> str:
    if not isinstance(name, str):
        raise _reject("E_LABEL_VOCABULARY", f"{what} must be a string")
    if normalise_name(name) != name:
        raise _reject(
            "E_LABEL_VOCABULARY",
            f"{what} {name[:80]!r} is not normalised (one space between words, none at the ends)",
        )
    if not 1 <= len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise _reject(
            "E_LABEL_VOCABULARY",
            f"{what} {name[:80]!r} must be 1-{MAX_NAME_CHARS} printable characters",
        )
    if ":" in name:
        raise _reject(
            "E_LABEL_VOCABULARY",
            f"{what} {name[:80]!r} contains ':', the namespace separator; a site names its own "
            "types and the ledger namespaces them",
        )
    if name.casefold() in _RESERVED:
        raise _reject("E_LABEL_VOCABULARY", f"{what} {name!r} is reserved (a missing-label marker)")
    return name


# --------------------------------------------------------------------------------------------
# differential privacy


def _phi(t: float) -> float:
    return 0.5 * math.erfc(-t / math.sqrt(2.0))


def _delta_of(sigma: float, epsilon: float, sensitivity: float) -> float:
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    return _phi(a - b) - math.exp(epsilon) * _phi(-a - b)


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest noise standard deviation (within 1e-9 relative) with which the Gaussian
    mechanism on a query of L2 ``sensitivity`` is (``epsilon``, ``delta``)-DP, by the exact
    analytic condition of Balle and Wang (2018, Theorem 8): ``Phi(D/(2s) - e s/D) - exp(e)
    Phi(-D/(2s) - e s/D) <= delta``. Pure Python (``math.erfc``), no SciPy."""
    if not (epsilon > 0 and 0 < delta < 1 and sensitivity > 0):
        raise ValueError("epsilon > 0, 0 < delta < 1 and sensitivity > 0 are required")
    lo, hi = 1e-12 * sensitivity, sensitivity
    while _delta_of(hi, epsilon, sensitivity) > delta:
        hi *= 2.0
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if _delta_of(mid, epsilon, sensitivity) > delta:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.0 + 1e-12:
            break
    return hi


def bucket_count(n: int, bucket: int) -> int:
    """``n`` rounded down to a multiple of ``bucket``."""
    return (int(n) // int(bucket)) * int(bucket)


# --------------------------------------------------------------------------------------------
# the label policy


@dataclass(frozen=True)
class DPRequirement:
    clip_norm: float
    epsilon: float
    delta: float

    def to_json_obj(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "epsilon": self.epsilon, "delta": self.delta}


@dataclass(frozen=True)
class LabelPolicy:
    """The consortium's rules for label contributions (a ``label_policy`` ``settings`` entry)."""

    k: int = 20
    count_bucket: int = 10
    max_types: int = 64
    dp: DPRequirement | None = None

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "count_bucket": self.count_bucket,
            "max_types": self.max_types,
            "dp": None if self.dp is None else self.dp.to_json_obj(),
        }


DEFAULT_LABEL_POLICY = LabelPolicy()


@dataclass(frozen=True)
class LabelPolicyChange:
    action: str  # settings | accept | map
    origin: str
    settings: LabelPolicy | None = None
    label_key: str | None = None
    name: str | None = None
    target: str | None = None

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "kind": "label_policy",
            "format_version": 1,
            "origin": self.origin,
            "action": self.action,
        }
        if self.action == "settings":
            assert self.settings is not None
            obj["settings"] = self.settings.to_json_obj()
        else:
            obj["label_key"] = self.label_key
            obj["name"] = self.name
            obj["as" if self.action == "accept" else "to"] = self.target
        return obj


def _pos_float(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x <= 0:
        raise _policy_error(f"{what} must be a finite number > 0")
    return float(x)


def _pos_int(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise _policy_error(f"{what} must be an integer >= 1")
    return x


def parse_label_policy(obj: Any) -> LabelPolicyChange:
    """A ``label_policy`` payload object, strictly (exact fields and types) [E_LABEL_POLICY]."""
    if not isinstance(obj, dict):
        raise _policy_error("a label_policy payload is an object")
    base = {"kind", "format_version", "origin", "action"}
    action = obj.get("action")
    fields = {
        "settings": base | {"settings"},
        "accept": base | {"label_key", "name", "as"},
        "map": base | {"label_key", "name", "to"},
    }.get(action if isinstance(action, str) else "")
    if fields is None:
        raise _policy_error("label_policy action must be 'settings', 'accept' or 'map'")
    if set(obj) != fields:
        raise _policy_error(f"a label_policy {action} has exactly the fields {sorted(fields)}")
    if (
        obj["kind"] != "label_policy"
        or type(obj["format_version"]) is not int
        or obj["format_version"] != 1
    ):
        raise _policy_error("kind must be 'label_policy' with format_version 1")
    if not isinstance(obj["origin"], str):
        raise _policy_error("origin must be a string")
    if action == "settings":
        s = obj["settings"]
        if not isinstance(s, dict) or set(s) != {"k", "count_bucket", "max_types", "dp"}:
            raise _policy_error("settings has exactly k, count_bucket, max_types, dp")
        k, bucket, max_types = (
            _pos_int(s["k"], "k"),
            _pos_int(s["count_bucket"], "count_bucket"),
            _pos_int(s["max_types"], "max_types"),
        )
        if k < 2 or bucket > k:
            raise _policy_error(
                f"k must be >= 2 and count_bucket <= k (got k={k}, bucket={bucket})"
            )
        dp = None
        if s["dp"] is not None:
            d = s["dp"]
            if not isinstance(d, dict) or set(d) != {"clip_norm", "epsilon", "delta"}:
                raise _policy_error("dp is null or has exactly clip_norm, epsilon, delta")
            dp = DPRequirement(
                _pos_float(d["clip_norm"], "dp.clip_norm"),
                _pos_float(d["epsilon"], "dp.epsilon"),
                _pos_float(d["delta"], "dp.delta"),
            )
            if dp.delta >= 1:
                raise _policy_error("dp.delta must be below 1")
        return LabelPolicyChange(
            "settings", obj["origin"], settings=LabelPolicy(k, bucket, max_types, dp)
        )
    level, name = obj["label_key"], obj["name"]
    target = obj["as" if action == "accept" else "to"]
    if not isinstance(level, str) or not level:
        raise _policy_error("label_key must be a non-empty string")
    if not isinstance(name, str) or name.count(":") != 1:
        raise _policy_error(f"name must be a site type '<site>:<name>', got {str(name)[:80]!r}")
    site, local = name.split(":", 1)
    if not NAMESPACE_RE.fullmatch(site):
        raise _policy_error(f"{name[:80]!r} does not start with a site id")
    try:
        _check_type_name(local, "the type name")
        _check_type_name(target, "the shared name")
    except UpdateRejectedError as exc:
        raise _policy_error(exc.message) from exc
    return LabelPolicyChange(str(action), obj["origin"], label_key=level, name=name, target=target)


def label_policy_entry(
    change: LabelPolicyChange, operator_keys: Sequence[Ed25519PrivateKey]
) -> bytes:
    """The ``label_policy`` envelope of ``change`` signed by ``operator_keys``."""
    return sign_envelope(LABEL_POLICY_TYPE, canonical_json(change.to_json_obj()), operator_keys)


# --------------------------------------------------------------------------------------------
# contributions


@dataclass(frozen=True)
class ExpressionPrototype:
    """A type's mean (and spread, or the noise under DP) in the reference's public expression
    subspace (format version 2)."""

    mean: tuple[float, ...]
    std: tuple[float, ...] | None
    sigma: float

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": None if self.std is None else list(self.std),
            "sigma": self.sigma,
        }


@dataclass(frozen=True)
class Prototype:
    name: str
    count: int
    mean: tuple[float, ...]
    std: tuple[float, ...] | None
    sigma: float
    #: the same cells in the expression subspace; present exactly in format version 2
    expression: ExpressionPrototype | None = None

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "name": self.name,
            "count": self.count,
            "mean": list(self.mean),
            "std": None if self.std is None else list(self.std),
            "sigma": self.sigma,
        }
        if self.expression is not None:
            obj["expression"] = self.expression.to_json_obj()
        return obj


@dataclass(frozen=True)
class ContributionPayload:
    origin: str
    site_id: str
    key_id: str
    sequence: int
    base_size: int
    base_root: str
    base_digest: str
    label_key: str
    n_latent: int
    privacy: Mapping[str, Any]
    prototypes: tuple[Prototype, ...]
    #: components of the expression subspace the prototypes also carry (format version 2)
    n_expression: int | None = None

    @property
    def format_version(self) -> int:
        return 1 if self.n_expression is None else 2

    def to_json_obj(self) -> dict[str, Any]:
        obj = {
            "kind": "label_contribution",
            "format_version": self.format_version,
            "origin": self.origin,
            "site_id": self.site_id,
            "key_id": self.key_id,
            "sequence": self.sequence,
            "base": {"size": self.base_size, "root": self.base_root, "digest": self.base_digest},
            "label_key": self.label_key,
            "n_latent": self.n_latent,
            "privacy": dict(self.privacy),
            "prototypes": [p.to_json_obj() for p in self.prototypes],
        }
        if self.n_expression is not None:
            obj["n_expression"] = self.n_expression
        return obj

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json_obj())


def _f32(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(values, dtype=np.float32).astype(np.float64))


def build_contribution_payload(
    *,
    origin: str,
    site_id: str,
    site_key_id: str,
    sequence: int,
    base_size: int,
    base_root: bytes | str,
    base_digest: str,
    label_key: str,
    prototypes: Sequence[Mapping[str, Any]],
    privacy: Mapping[str, Any] | None = None,
) -> ContributionPayload:
    """The payload for ``prototypes`` (``{name, count, mean, std or None, sigma}`` each, count
    already bucketed, and optionally ``expression``: ``{mean, std or None, sigma}`` in the
    reference's expression subspace, then on every prototype: format version 2): numbers are
    stored at float32 precision, names normalised."""
    protos = []
    with_expression = [p.get("expression") is not None for p in prototypes]
    if any(with_expression) and not all(with_expression):
        raise _bad("either every prototype carries its expression part or none does")
    for p in prototypes:
        mean = _f32(p["mean"])
        std = None if p.get("std") is None else _f32(p["std"])
        expr = None
        if p.get("expression") is not None:
            e = p["expression"]
            expr = ExpressionPrototype(
                _f32(e["mean"]),
                None if e.get("std") is None else _f32(e["std"]),
                float(e.get("sigma", 0.0)),
            )
        values = (*mean, *(std or ()))
        if expr is not None:
            values = (*values, *expr.mean, *(expr.std or ()))
        if not all(math.isfinite(v) for v in values):
            raise _reject("E_NONFINITE", f"the prototype of {p['name']!r} holds NaN or Inf")
        protos.append(
            Prototype(
                normalise_name(p["name"]),
                int(p["count"]),
                mean,
                std,
                float(p.get("sigma", 0.0)),
                expr,
            )
        )
    n_latent = len(protos[0].mean) if protos else 0
    n_expression = None
    if protos and protos[0].expression is not None:
        n_expression = len(protos[0].expression.mean)
    root = base_root.hex() if isinstance(base_root, bytes | bytearray) else str(base_root)
    return ContributionPayload(
        origin=origin,
        site_id=site_id,
        key_id=site_key_id,
        sequence=int(sequence),
        base_size=int(base_size),
        base_root=root,
        base_digest=base_digest,
        label_key=label_key,
        n_latent=n_latent,
        privacy=dict(privacy or {"mechanism": "none"}),
        prototypes=tuple(protos),
        n_expression=n_expression,
    )


def sign_contribution(payload: ContributionPayload, site_key: Ed25519PrivateKey) -> bytes:
    if key_id(site_key) != payload.key_id:
        raise _reject("E_SITE_MISMATCH", "the payload names another key id than the signing key")
    return sign_envelope(LABEL_CONTRIBUTION_TYPE, payload.to_bytes(), [site_key])


def _bad(msg: str) -> UpdateRejectedError:
    return UpdateRejectedError("E_PAYLOAD_MALFORMED", msg)


def _int(x: Any, what: str, lo: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise _bad(f"{what} must be an integer >= {lo}")
    return x


def _num(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise _bad(f"{what} must be a number")
    if not math.isfinite(x):
        raise _reject("E_NONFINITE", f"{what} is not finite")
    return float(x)


def _vector(x: Any, what: str) -> tuple[float, ...]:
    if not isinstance(x, list):
        raise _bad(f"{what} must be a list of numbers")
    return tuple(_num(v, what) for v in x)


def parse_contribution_payload(
    data: bytes, *, limits: Limits = DEFAULT_LIMITS
) -> ContributionPayload:
    """Parse payload bytes strictly (rule 3 of the module docstring, without origin/signer)."""
    try:
        obj = parse_json_strict(
            data,
            max_bytes=limits.max_payload_bytes,
            max_depth=6,
            require_canonical=True,
            what="label contribution payload",
        )
    except VerificationError as exc:
        code = "E_NONFINITE" if exc.reason_code == "E_JSON_NONFINITE" else "E_PAYLOAD_MALFORMED"
        if exc.reason_code == "E_OVERSIZE":
            code = "E_OVERSIZE"
        raise UpdateRejectedError(code, exc.message) from exc
    fields = {
        "kind",
        "format_version",
        "origin",
        "site_id",
        "key_id",
        "sequence",
        "base",
        "label_key",
        "n_latent",
        "privacy",
        "prototypes",
    }
    version = obj.get("format_version") if isinstance(obj, dict) else None
    if type(version) is int and version == 2:
        fields = fields | {"n_expression"}
    if not isinstance(obj, dict) or set(obj) != fields:
        raise _bad(f"a label contribution payload has exactly the fields {sorted(fields)}")
    if obj["kind"] != "label_contribution" or type(version) is not int or version not in (1, 2):
        raise _bad("kind must be 'label_contribution' with format_version 1 or 2")
    for f in ("origin", "site_id", "key_id", "label_key"):
        if not isinstance(obj[f], str):
            raise _bad(f"{f} must be a string")
    if not NAMESPACE_RE.fullmatch(obj["site_id"]):
        raise _bad("site_id is not a valid site id")
    if not _HEX64.fullmatch(obj["key_id"]):
        raise _bad("key_id must be 64 lowercase hex characters")
    base = obj["base"]
    if not isinstance(base, dict) or set(base) != {"size", "root", "digest"}:
        raise _bad("base has exactly size, root, digest")
    if not isinstance(base["root"], str) or not _HEX64.fullmatch(base["root"]):
        raise _bad("base.root must be 64 lowercase hex characters")
    if not isinstance(base["digest"], str) or not _DIGEST.fullmatch(base["digest"]):
        raise _bad("base.digest must be 'sha256:<64 hex>'")
    priv = obj["privacy"]
    if not isinstance(priv, dict) or priv.get("mechanism") not in ("none", "gaussian"):
        raise _bad("privacy.mechanism must be 'none' or 'gaussian'")
    if priv["mechanism"] == "none" and set(priv) != {"mechanism"}:
        raise _bad("privacy 'none' has no other field")
    if priv["mechanism"] == "gaussian":
        dp_fields = ["clip_norm", "epsilon", "delta"]
        if version == 2:
            dp_fields.append("expression_clip_norm")
        if set(priv) != {"mechanism", *dp_fields}:
            raise _bad(f"privacy 'gaussian' has exactly mechanism, {', '.join(dp_fields)}")
        for f in dp_fields:
            if _num(priv[f], f"privacy.{f}") <= 0:
                raise _bad(f"privacy.{f} must be > 0")
    protos_obj = obj["prototypes"]
    if not isinstance(protos_obj, list):
        raise _bad("prototypes must be a list")
    protos = []
    proto_fields = {"name", "count", "mean", "std", "sigma"}
    if version == 2:
        proto_fields = proto_fields | {"expression"}
    for i, p in enumerate(protos_obj):
        if not isinstance(p, dict) or set(p) != proto_fields:
            raise _bad(f"prototypes[{i}] has exactly {', '.join(sorted(proto_fields))}")
        if not isinstance(p["name"], str):
            raise _bad(f"prototypes[{i}].name must be a string")
        std = None if p["std"] is None else _vector(p["std"], f"prototypes[{i}].std")
        sigma = _num(p["sigma"], f"prototypes[{i}].sigma")
        if sigma < 0:
            raise _bad(f"prototypes[{i}].sigma must be >= 0")
        expr = None
        if version == 2:
            e = p["expression"]
            if not isinstance(e, dict) or set(e) != {"mean", "std", "sigma"}:
                raise _bad(f"prototypes[{i}].expression has exactly mean, std, sigma")
            e_sigma = _num(e["sigma"], f"prototypes[{i}].expression.sigma")
            if e_sigma < 0:
                raise _bad(f"prototypes[{i}].expression.sigma must be >= 0")
            expr = ExpressionPrototype(
                _vector(e["mean"], f"prototypes[{i}].expression.mean"),
                None if e["std"] is None else _vector(e["std"], f"prototypes[{i}].expression.std"),
                e_sigma,
            )
        protos.append(
            Prototype(
                p["name"],
                _int(p["count"], f"prototypes[{i}].count", 0),
                _vector(p["mean"], f"prototypes[{i}].mean"),
                std,
                sigma,
                expr,
            )
        )
    return ContributionPayload(
        origin=obj["origin"],
        site_id=obj["site_id"],
        key_id=obj["key_id"],
        sequence=_int(obj["sequence"], "sequence", 1),
        base_size=_int(base["size"], "base.size", 1),
        base_root=base["root"],
        base_digest=base["digest"],
        label_key=obj["label_key"],
        n_latent=_int(obj["n_latent"], "n_latent", 1),
        privacy=priv,
        prototypes=tuple(protos),
        n_expression=_int(obj["n_expression"], "n_expression", 1) if version == 2 else None,
    )


@dataclass(frozen=True)
class LabelContext:
    """The trusted state a contribution is checked against (from
    :meth:`protocols.ledger.LedgerState.label_context`). ``levels``: the reference's label levels
    (name -> latent dimension)."""

    policy: TrustPolicy
    label_policy: LabelPolicy
    tree_size: int
    root_at: Callable[[int], bytes | None]
    digest_at: Callable[[int], str | None]
    last_sequence: Mapping[str, int]
    min_base_size: int
    levels: Mapping[str, int]
    #: label levels with expression prototypes in the reference: name -> subspace components
    expression_levels: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AcceptedContribution:
    payload: ContributionPayload
    envelope: bytes = field(repr=False)

    @property
    def site_id(self) -> str:
        return self.payload.site_id

    @property
    def sequence(self) -> int:
        return self.payload.sequence


@dataclass(frozen=True)
class AuthenticatedContribution:
    """A contribution whose signature verified under the active key of an enrolled site (rules
    1-3): only now may anything be charged to ``site_id``."""

    envelope: bytes = field(repr=False)
    payload: ContributionPayload
    site_id: str


def authenticate_contribution(
    envelope: bytes, policy: TrustPolicy, *, limits: Limits = DEFAULT_LIMITS
) -> AuthenticatedContribution:
    """Rules 1-3 of the module docstring: bounded work that reads no per-site state (what a
    coordinator runs before its per-site rate limit). Pure."""
    payload, site = _authenticate(envelope, policy, limits)
    return AuthenticatedContribution(bytes(envelope), payload, site)


def _authenticate(
    envelope: bytes, policy: TrustPolicy, limits: Limits
) -> tuple[ContributionPayload, str]:
    if not isinstance(envelope, bytes | bytearray):
        raise _reject("E_ENVELOPE_MALFORMED", "the envelope must be bytes")
    if len(envelope) > limits.max_envelope_bytes:
        raise _reject(
            "E_OVERSIZE", f"envelope is {len(envelope)} bytes, over {limits.max_envelope_bytes}"
        )
    try:
        env = parse_envelope(bytes(envelope), limits=limits)
    except VerificationError as exc:
        code = "E_OVERSIZE" if exc.reason_code == "E_OVERSIZE" else "E_ENVELOPE_MALFORMED"
        raise _reject(code, exc.message) from exc
    if env.payload_type != LABEL_CONTRIBUTION_TYPE:
        raise _reject(
            "E_PAYLOAD_TYPE",
            f"payloadType {env.payload_type[:80]!r} is not {LABEL_CONTRIBUTION_TYPE!r}",
        )
    if len(env.signatures) != 1:
        raise _reject(
            "E_ENVELOPE_MALFORMED",
            "a label contribution carries exactly one signature (the site's)",
        )
    kid = env.signatures[0].keyid
    found = policy.find_key(kid)
    if found is None:
        raise _reject(
            "E_KEY_UNKNOWN",
            f"key {kid[:16]}... is not enrolled; ask the operator to enrol this site",
        )
    site, skey = found
    if skey.status == "revoked":
        raise _reject("E_KEY_REVOKED", f"key {kid[:16]}... of site {site!r} was revoked")
    if skey.status == "rotated":
        raise _reject(
            "E_KEY_ROTATED",
            f"key {kid[:16]}... of site {site!r} was rotated out; sign with the new key",
        )
    try:
        verify_envelope(
            env,
            trusted_keys=[public_key_from_text(skey.public_key)],
            threshold=1,
            payload_type=LABEL_CONTRIBUTION_TYPE,
            limits=limits,
        )
    except VerificationError as exc:
        raise _reject("E_SIG_INVALID", exc.message) from exc
    payload = parse_contribution_payload(env.payload, limits=limits)
    if payload.origin != policy.origin:
        raise _reject(
            "E_ORIGIN_MISMATCH",
            f"the contribution is for log {payload.origin[:80]!r}, this log is {policy.origin!r}",
        )
    if payload.site_id != site or payload.key_id != kid:
        raise _reject(
            "E_SITE_MISMATCH",
            f"the payload names site {payload.site_id!r}, but site {site!r}'s key signed it",
        )
    return payload, site


def validate_label_contribution(
    envelope: bytes, ctx: LabelContext, *, limits: Limits = DEFAULT_LIMITS
) -> AcceptedContribution:
    """Accept or reject a label contribution under the rules of the module docstring. Pure."""
    payload, site = _authenticate(envelope, ctx.policy, limits)
    last = int(ctx.last_sequence.get(site, 0))
    if payload.sequence <= last:
        raise _reject(
            "E_SEQUENCE_REPLAY",
            f"sequence {payload.sequence} of site {site!r} is not above the last accepted ({last})",
        )
    size = payload.base_size
    root = ctx.root_at(size) if 1 <= size <= ctx.tree_size else None
    if root is None or root.hex() != payload.base_root:
        raise _reject(
            "E_BASE_UNKNOWN",
            f"base checkpoint (size {size}, root {payload.base_root[:16]}...) is not a checkpoint of this log",
        )
    if ctx.digest_at(size) != payload.base_digest:
        raise _reject(
            "E_BASE_DIGEST_MISMATCH",
            f"base digest {payload.base_digest} is not reference version {size}",
        )
    if size < ctx.min_base_size:
        raise _reject(
            "E_BASE_STALE",
            f"base size {size} predates the last change of the shared weights (size {ctx.min_base_size}): its latent space is gone; map again",
        )
    if payload.label_key not in ctx.levels:
        raise _reject(
            "E_LABEL_LEVEL",
            f"the reference has no label level {payload.label_key[:80]!r}; it has {sorted(ctx.levels)}",
        )
    lp = ctx.label_policy
    if not 1 <= len(payload.prototypes) <= lp.max_types:
        raise _reject(
            "E_OVERSIZE",
            f"{len(payload.prototypes)} prototypes; the label policy allows 1 to {lp.max_types} per contribution",
        )
    dim = int(ctx.levels[payload.label_key])
    if payload.n_latent != dim:
        raise _reject(
            "E_LABEL_LATENT_DIM",
            f"n_latent is {payload.n_latent}, the reference's latent space has {dim} dimensions",
        )
    keys: set[str] = set()
    for p in payload.prototypes:
        if len(p.mean) != dim or (p.std is not None and len(p.std) != dim):
            raise _reject(
                "E_LABEL_LATENT_DIM", f"the prototype of {p.name[:80]!r} is not {dim}-dimensional"
            )
        if p.std is not None and min(p.std) <= 0:
            raise _bad(f"the spread of {p.name[:80]!r} must be > 0 in every dimension")
        _check_expression(p, payload, ctx)
        _check_type_name(p.name, "type name")
        if name_key(p.name) in keys:
            raise _reject(
                "E_LABEL_VOCABULARY", f"type {p.name!r} appears twice (after normalisation)"
            )
        keys.add(name_key(p.name))
        if p.count < lp.k or p.count % lp.count_bucket:
            raise _reject(
                "E_LABEL_BELOW_K",
                f"type {p.name!r} has count {p.count}; a prototype needs at least k={lp.k} cells, the count rounded down to a multiple of {lp.count_bucket}",
            )
    _check_privacy(payload, lp)
    return AcceptedContribution(payload, bytes(envelope))


def _check_expression(p: Prototype, payload: ContributionPayload, ctx: LabelContext) -> None:
    """Rule 9 (format version 2): the expression part fits the reference's subspace."""
    if payload.n_expression is None:
        return
    want = ctx.expression_levels.get(payload.label_key)
    if want is None:
        raise _reject(
            "E_LABEL_EXPRESSION",
            f"the reference carries no expression prototypes for {payload.label_key[:80]!r}; "
            "contribute latent prototypes only (format version 1)",
        )
    if payload.n_expression != want:
        raise _reject(
            "E_LABEL_EXPRESSION",
            f"n_expression is {payload.n_expression}, the reference's expression subspace has "
            f"{want} components",
        )
    e = p.expression
    assert e is not None  # the parser requires it in version 2
    if len(e.mean) != want or (e.std is not None and len(e.std) != want):
        raise _reject(
            "E_LABEL_EXPRESSION",
            f"the expression prototype of {p.name[:80]!r} is not {want}-dimensional",
        )
    if e.std is not None and min(e.std) <= 0:
        raise _bad(f"the expression spread of {p.name[:80]!r} must be > 0 in every component")


def joint_noise_scale(epsilon: float, delta: float, count: int, parts: int) -> float:
    """The noise, in units of each part's clip norm, with which releasing ``parts`` means of
    the same ``count`` cells (each cell's vector clipped per part to its part's norm) is one
    Gaussian mechanism at (``epsilon``, ``delta``): the concatenation of the parts, each
    divided by its clip norm, has L2 sensitivity ``2 sqrt(parts) / count``."""
    return gaussian_sigma(epsilon, delta, 2.0 * math.sqrt(parts) / max(int(count), 1))


def _check_privacy(payload: ContributionPayload, lp: LabelPolicy) -> None:
    priv = payload.privacy
    if priv["mechanism"] == "none":
        if lp.dp is not None:
            raise _reject(
                "E_LABEL_DP_WEAK",
                f"the label policy requires the Gaussian mechanism (clip {lp.dp.clip_norm:g}, epsilon {lp.dp.epsilon:g}, delta {lp.dp.delta:g}); this contribution has none",
            )
        for p in payload.prototypes:
            if p.std is None or p.sigma != 0:
                raise _bad(f"without a mechanism, {p.name!r} carries its spread and sigma 0")
            e = p.expression
            if e is not None and (e.std is None or e.sigma != 0):
                raise _bad(
                    f"without a mechanism, {p.name!r} carries its expression spread and sigma 0"
                )
        return
    eps, delta, clip = float(priv["epsilon"]), float(priv["delta"]), float(priv["clip_norm"])
    if lp.dp is not None and (eps > lp.dp.epsilon or delta > lp.dp.delta or clip > lp.dp.clip_norm):
        raise _reject(
            "E_LABEL_DP_WEAK",
            f"(epsilon {eps:g}, delta {delta:g}, clip {clip:g}) is weaker than the policy's (epsilon {lp.dp.epsilon:g}, delta {lp.dp.delta:g}, clip {lp.dp.clip_norm:g})",
        )
    if delta >= 1:
        raise _bad("privacy.delta must be below 1")
    parts = 1 if payload.n_expression is None else 2
    for p in payload.prototypes:
        e = p.expression
        if p.std is not None or (e is not None and e.std is not None):
            raise _reject(
                "E_LABEL_DP_WEAK",
                f"{p.name!r}: under the Gaussian mechanism the spread is not released (std must be null)",
            )
        scale = joint_noise_scale(eps, delta, p.count, parts)
        need = (
            clip * scale if parts > 1 else gaussian_sigma(eps, delta, 2.0 * clip / max(p.count, 1))
        )
        if p.sigma < need * (1.0 - _SIGMA_RTOL):
            raise _reject(
                "E_LABEL_DP_WEAK",
                f"{p.name!r}: sigma {p.sigma:.6g} is below the {need:.6g} that (epsilon {eps:g}, delta {delta:g}) needs for clip {clip:g} and {p.count} cells",
            )
        if e is not None:
            e_clip = float(priv["expression_clip_norm"])
            e_need = e_clip * scale
            if e.sigma < e_need * (1.0 - _SIGMA_RTOL):
                raise _reject(
                    "E_LABEL_DP_WEAK",
                    f"{p.name!r}: expression sigma {e.sigma:.6g} is below the {e_need:.6g} that (epsilon {eps:g}, delta {delta:g}) needs for expression clip {e_clip:g} and {p.count} cells (one mechanism over both parts)",
                )


# --------------------------------------------------------------------------------------------
# the replayed label state


@dataclass(frozen=True)
class _Contribution:
    index: int
    site_id: str
    label_key: str
    prototypes: tuple[Prototype, ...]
    #: per prototype, the vocabulary type its name matched when the entry was accepted, or None
    known: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class LabelLedger:
    """The label side of a replayed ledger (immutable; every change returns a new one):
    the label policy, every vocabulary decision, and the contributions accepted on the current
    lineage (emptied when a genesis or federated round replaces the latent space).
    :class:`protocols.ledger.LedgerState` keeps one per entry that changed it (``labels_at``)."""

    policy: LabelPolicy = DEFAULT_LABEL_POLICY
    accepted: tuple[tuple[str, str, str], ...] = ()  # (level, "<site>:<name>", shared name)
    mapped: tuple[tuple[str, str, str], ...] = ()  # (level, "<site>:<name>", target)
    contributions: tuple[_Contribution, ...] = ()

    def with_policy_change(
        self,
        change: LabelPolicyChange,
        reference_labels: Mapping[str, Any] | None,
        *,
        enrolled: Collection[str],
    ) -> LabelLedger:
        """:func:`apply_label_policy`."""
        return apply_label_policy(self, change, reference_labels, enrolled=enrolled)

    def pending_names(self, level: str, site_id: str | None = None) -> list[str]:
        """The site types (``"<site>:<name>"``) that contributions on the current lineage
        brought to ``level`` and that no ``accept`` or ``map`` has decided yet, in ledger
        order (of ``site_id`` only, if given): what an operator can accept or map."""
        decided = {n for lvl, n, _ in (*self.accepted, *self.mapped) if lvl == level}
        out: list[str] = []
        for c in self.contributions:
            if c.label_key != level or (site_id is not None and c.site_id != site_id):
                continue
            for p, known in zip(c.prototypes, c.known or (None,) * len(c.prototypes), strict=True):
                own = f"{c.site_id}:{p.name}"
                if known is None and own not in decided and own not in out:
                    out.append(own)
        return out

    def with_contribution(
        self, index: int, accepted: AcceptedContribution, reference_labels: Mapping[str, Any] | None
    ) -> LabelLedger:
        p = accepted.payload
        vocab = self.vocabulary(reference_labels, p.label_key)
        known = tuple(vocab.get(name_key(q.name)) for q in p.prototypes)
        c = _Contribution(index, p.site_id, p.label_key, p.prototypes, known)
        return replace(self, contributions=(*self.contributions, c))

    def new_lineage(self) -> LabelLedger:
        return replace(self, contributions=())

    def vocabulary(self, reference_labels: Mapping[str, Any] | None, level: str) -> dict[str, str]:
        """name key -> canonical name: the reference's classes and the accepted names."""
        vocab: dict[str, str] = {}
        lv = _levels(reference_labels).get(level)
        if lv is not None:
            for c in lv.get("prototype", {}).get("classes", []):
                vocab.setdefault(name_key(c), c)
        for lvl, _name, shared in self.accepted:
            if lvl == level:
                vocab.setdefault(name_key(shared), shared)
        return vocab

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_json_obj(),
            "accepted": [list(a) for a in self.accepted],
            "mapped": [list(m) for m in self.mapped],
            "contributions": [
                {
                    "index": c.index,
                    "site_id": c.site_id,
                    "label_key": c.label_key,
                    "prototypes": [p.to_json_obj() for p in c.prototypes],
                    "known": list(c.known),
                }
                for c in self.contributions
            ],
        }

    @classmethod
    def from_json_obj(cls, obj: Mapping[str, Any]) -> LabelLedger:
        change = parse_label_policy(
            {
                "kind": "label_policy",
                "format_version": 1,
                "origin": "",
                "action": "settings",
                "settings": obj["policy"],
            }
        )
        assert change.settings is not None
        return cls(
            policy=change.settings,
            accepted=tuple(tuple(a) for a in obj["accepted"]),
            mapped=tuple(tuple(m) for m in obj["mapped"]),
            contributions=tuple(
                _Contribution(
                    int(c["index"]),
                    str(c["site_id"]),
                    str(c["label_key"]),
                    tuple(
                        Prototype(
                            p["name"],
                            int(p["count"]),
                            tuple(p["mean"]),
                            None if p["std"] is None else tuple(p["std"]),
                            float(p["sigma"]),
                            None
                            if p.get("expression") is None
                            else ExpressionPrototype(
                                tuple(p["expression"]["mean"]),
                                None
                                if p["expression"]["std"] is None
                                else tuple(p["expression"]["std"]),
                                float(p["expression"]["sigma"]),
                            ),
                        )
                        for p in c["prototypes"]
                    ),
                    tuple(c["known"]),
                )
                for c in obj["contributions"]
            ),
        )


def _levels(reference_labels: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not reference_labels or not isinstance(reference_labels.get("levels"), Mapping):
        return {}
    return reference_labels["levels"]


def reference_levels(reference_labels: Mapping[str, Any] | None) -> dict[str, int]:
    """Label levels that can take contributions (they have prototypes): name -> latent dim."""
    out = {}
    n = (reference_labels or {}).get("n_latent")
    for name, lv in _levels(reference_labels).items():
        proto = lv.get("prototype") if isinstance(lv, Mapping) else None
        if isinstance(n, int) and isinstance(proto, Mapping) and proto.get("classes"):
            out[str(name)] = int(n)
    return out


def reference_expression_levels(reference_labels: Mapping[str, Any] | None) -> dict[str, int]:
    """Label levels that can take expression prototypes (the reference carries expression
    prototypes for them): name -> components of its expression subspace."""
    projection = (reference_labels or {}).get("expression")
    n = projection.get("n_components") if isinstance(projection, Mapping) else None
    if not isinstance(n, int) or isinstance(n, bool):
        return {}
    levels = reference_levels(reference_labels)
    return {
        name: n
        for name, lv in _levels(reference_labels).items()
        if str(name) in levels
        and isinstance(lv, Mapping)
        and isinstance(lv.get("expression"), Mapping)
    }


def apply_label_policy(
    state: LabelLedger,
    change: LabelPolicyChange,
    reference_labels: Mapping[str, Any] | None,
    *,
    enrolled: Collection[str],
) -> LabelLedger:
    """The label state after ``change`` (rules in the module docstring) [E_LABEL_POLICY,
    E_LABEL_POLICY_SITE_UNKNOWN, E_LABEL_POLICY_NOT_CONTRIBUTED]. ``enrolled``: the site ids
    the trust policy in force knows (enrolled, revoked keys included)."""
    if change.action == "settings":
        assert change.settings is not None
        return replace(state, policy=change.settings)
    assert change.label_key is not None and change.name is not None and change.target is not None
    level = change.label_key
    if level not in _levels(reference_labels):
        raise _policy_error(f"the reference has no label level {level!r}")
    site = change.name.split(":", 1)[0]
    if site not in enrolled:
        raise _reject(
            "E_LABEL_POLICY_SITE_UNKNOWN",
            f"{change.name!r} names site {site!r}, which is not enrolled in this consortium; "
            "a name can only be accepted or mapped once an enrolled site has contributed it "
            "(`coordinator label-policy show` lists the names awaiting a decision)",
        )
    if any(lvl == level and n == change.name for lvl, n, _ in (*state.accepted, *state.mapped)):
        raise _policy_error(f"{change.name!r} was already accepted or mapped at level {level!r}")
    pending = state.pending_names(level, site)
    if change.name not in pending:
        raise _reject(
            "E_LABEL_POLICY_NOT_CONTRIBUTED",
            f"site {site!r} has not contributed a type {change.name.split(':', 1)[1]!r} at level "
            f"{level!r} on the current reference, so there is nothing to {change.action}; "
            + (
                f"its names awaiting a decision: {', '.join(pending[:20])}"
                if pending
                else "it has no contributed name awaiting a decision"
            )
            + " (a name can be decided only after its contribution is in the ledger)",
        )
    vocab = state.vocabulary(reference_labels, level)
    if change.action == "accept":
        if name_key(change.target) in vocab:
            raise _policy_error(
                f"{change.target!r} is already in the vocabulary of {level!r} (as "
                f"{vocab[name_key(change.target)]!r}); use `label-policy map` to map onto it"
            )
        return replace(state, accepted=(*state.accepted, (level, change.name, change.target)))
    if name_key(change.target) not in vocab:
        raise _policy_error(
            f"{change.target!r} is not in the vocabulary of {level!r}; accept a name first or map "
            f"onto one of {sorted(vocab.values())[:20]}"
        )
    return replace(
        state, mapped=(*state.mapped, (level, change.name, vocab[name_key(change.target)]))
    )


def resolve_name(state: LabelLedger, level: str, site_id: str, name: str, known: str | None) -> str:
    """The type a site's contributed ``name`` stands for: ``known`` (the vocabulary type it
    matched when its entry was accepted), else the site's own ``<site>:<name>`` as the operator
    accepted or mapped it since, else that namespaced name. A name accepted into the vocabulary
    later never captures an earlier contribution of another site: only an explicit ``map`` does."""
    if known is not None:
        return known
    own = f"{site_id}:{name}"
    for lvl, n, target in state.mapped:
        if lvl == level and n == own:
            return target
    for lvl, n, shared in state.accepted:
        if lvl == level and n == own:
            return shared
    return own


def _contributed_expression(
    lv: Mapping[str, Any], state: LabelLedger, level: str
) -> dict[str, Any] | None:
    """The level's ``expression`` section with ``contributed``: one entry per contributed
    prototype that carries an expression part, in ledger order (``label`` resolved through the
    vocabulary, ``anchor`` true where the reference's expression prototypes already hold that
    type); None when neither the level nor any contribution has expression prototypes."""
    expr = lv.get("expression")
    if not isinstance(expr, Mapping):
        return None
    own = set(expr.get("classes", []))
    contributed = []
    for c in state.contributions:
        if c.label_key != level:
            continue
        for p, known in zip(c.prototypes, c.known or (None,) * len(c.prototypes), strict=True):
            if p.expression is None:
                continue
            name = resolve_name(state, level, c.site_id, p.name, known)
            contributed.append(
                {
                    "label": name,
                    "anchor": name in own,
                    "n_cells": int(p.count),
                    "mean": list(p.expression.mean),
                    "std": None if p.expression.std is None else list(p.expression.std),
                    "sigma": p.expression.sigma,
                    "source": f"{c.site_id}#{c.index}",
                }
            )
    if not contributed:
        return None
    return {**expr, "contributed": contributed}


def merge_label_knowledge(
    reference_labels: Mapping[str, Any] | None, state: LabelLedger
) -> dict[str, Any] | None:
    """The label knowledge of a version: ``reference_labels`` (the bundle's
    ``manifest["labels"]``) with every contribution of ``state`` added as prototypes.

    Per contributed prototype (count ``n``, mean ``m``, spread ``s`` or, under DP, the pooled
    spread, noise ``sigma``): ``spread_inflation = (1 + 1/n) max(1, mean_d((s_d^2 + sigma^2) /
    S_dd))`` against the pooled covariance ``S``, so a noisy or wide contribution claims no
    sharper a region than it can; the class's mixture weights and the class priors are in
    proportion to cell counts. The temperature and novelty calibration stay the reference's.
    Returns None when ``reference_labels`` is None."""
    if reference_labels is None:
        return None
    if not state.contributions:
        return dict(reference_labels)
    out = {**reference_labels, "levels": dict(_levels(reference_labels))}
    for level in sorted({c.label_key for c in state.contributions}):
        lv = out["levels"].get(level)
        if lv is None or "prototype" not in lv:
            continue
        expression = _contributed_expression(lv, state, level)
        if expression is not None:
            lv = {**lv, "expression": expression}
        proto = dict(lv["prototype"])
        classes = list(proto["classes"])
        counts = {c: float(n) for c, n in zip(classes, proto.get("cell_counts", []), strict=False)}
        if len(counts) != len(classes):  # an older bundle: priors stand in for counts
            total = float(sum(proto.get("type_cell_counts", {}).values()) or 1.0)
            counts = {
                c: float(p) * total for c, p in zip(classes, proto["class_prior"], strict=True)
            }
        diag = np.diag(np.asarray(proto["shared_covariance"], dtype=np.float64))
        genesis_counts = dict(counts)
        added: list[dict[str, Any]] = []
        listing = []
        for c in state.contributions:
            if c.label_key != level:
                continue
            for p, known in zip(c.prototypes, c.known or (None,) * len(c.prototypes), strict=True):
                name = resolve_name(state, level, c.site_id, p.name, known)
                var = diag if p.std is None else np.square(np.asarray(p.std, dtype=np.float64))
                r = float(np.mean((var + p.sigma**2) / diag))
                a = (1.0 + 1.0 / max(p.count, 1)) * max(1.0, r)
                source = f"{c.site_id}#{c.index}"
                added.append(
                    {
                        "label": name,
                        "mean": list(p.mean),
                        "std": [float(v) for v in np.sqrt(np.asarray(var, dtype=np.float32))],
                        "n_cells": int(p.count),
                        "spread_inflation": float(np.float32(a)),
                        "source": source,
                    }
                )
                listing.append(
                    {
                        "source": source,
                        "label": name,
                        "name": p.name,
                        "count": p.count,
                        "sigma": p.sigma,
                    }
                )
                if name not in counts:
                    classes.append(name)
                    counts[name] = 0.0
                counts[name] += float(p.count)
        protos = []
        for q in proto["prototypes"]:
            g = genesis_counts.get(q["label"], 0.0)
            q = dict(q)
            q["weight"] = (
                float(np.float32(q["weight"] * g / counts[q["label"]]))
                if counts[q["label"]]
                else q["weight"]
            )
            protos.append(q)
        for q in added:
            q["weight"] = float(np.float32(q["n_cells"] / counts[q["label"]]))
            protos.append(q)
        total = sum(counts.values())
        proto.update(
            {
                "classes": classes,
                "cell_counts": [int(counts[c]) for c in classes],
                "prototypes": protos,
                "class_prior": [float(np.float32(counts[c] / total)) for c in classes],
                "contributions": listing,
            }
        )
        out["levels"][level] = {**lv, "prototype": proto}
    return out
