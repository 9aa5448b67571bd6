"""Fault injection for simulation tests, as Flower client mods around the real ClientApp (the
deployed app carries no fault hooks). Virtual site ``site-i`` is partition ``i``."""

from __future__ import annotations

import json
from typing import Any


def _is(message: Any, context: Any, partition: int, rnd: int) -> bool:
    return (
        message.metadata.message_type == "train"
        and int(context.node_config["partition-id"]) == partition
        and int(message.content.config_records["config"]["round"]) == rnd
    )


def fail(partition: int, rnd: int) -> Any:
    """The site's ClientApp raises in round ``rnd``: the coordinator gets an error reply."""

    def mod(message: Any, context: Any, call_next: Any) -> Any:
        if _is(message, context, partition, rnd):
            raise RuntimeError(f"injected failure of partition {partition} in round {rnd}")
        return call_next(message, context)

    return mod


def tamper(partition: int, rnd: int) -> Any:
    """A man in the middle raises the signed ``n_train`` tenfold in round ``rnd`` to dominate
    the average, keeping the site's signature: the coordinator must exclude it."""

    def mod(message: Any, context: Any, call_next: Any) -> Any:
        reply = call_next(message, context)
        if not _is(message, context, partition, rnd):
            return reply
        from flwr.app import ConfigRecord

        from protocols.canonical import canonical_json
        from protocols.dsse import Envelope, parse_envelope

        env = parse_envelope(bytes(reply.content.config_records["signature"]["envelope"]))
        payload = json.loads(env.payload)
        payload["n_train"] = int(payload["n_train"]) * 10
        forged = Envelope(env.payload_type, canonical_json(payload), env.signatures).to_bytes()
        reply.content.config_records["signature"] = ConfigRecord({"envelope": forged})
        return reply

    return mod
