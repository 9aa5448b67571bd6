"""The command-line layer above the roles: what composes the operator's side (``coordinator``)
and the site's side (``site_agent``) in one place.

Dependencies point down: this package may import ``coordinator``, ``site_agent``,
``scarches_fl`` and ``protocols``; none of them imports it, and ``coordinator`` and
``site_agent`` never import each other (``docs/architecture.md``). Today it holds the
``scarches-fl federate`` commands (their site-side and operator-side subcommands), the
federated simulation, which runs the coordinator's ServerApp and the site's ClientApp together
on one machine, and ``scarches-fl demo`` (a coordinator, sites and an auditor on loopback).
"""
