"""The command line, all of it: the layer above the roles, where the operator's side
(``coordinator``) and the site's side (``site_agent``) meet.

Dependencies point down: this package may import ``coordinator``, ``site_agent``,
``scarches_fl`` and ``protocols``; none of them imports it, none of them holds command-line code,
and ``coordinator`` and ``site_agent`` never import each other (``docs/architecture.md``,
ADR 0083). :mod:`scarches_fl_cli.main` is the ``scarches-fl`` entry point (also
``python -m scarches_fl_cli``); one module per command group registers its subcommands:
:mod:`~scarches_fl_cli.reference`, :mod:`~scarches_fl_cli.map`, :mod:`~scarches_fl_cli.evaluate`,
:mod:`~scarches_fl_cli.coordinator`, :mod:`~scarches_fl_cli.site`, :mod:`~scarches_fl_cli.audit`
(``audit`` and ``ledger``), :mod:`~scarches_fl_cli.federate` and :mod:`~scarches_fl_cli.demo`
(a coordinator, sites and an auditor on loopback). :mod:`scarches_fl_cli.federated_simulation`
runs the coordinator's ServerApp and the sites' ClientApps together on one machine.
"""
