"""The site agent: what a site admin runs next to private data.

``scarches-fl site keygen | map | status | outbox | retry | rotate-key``
(command line in ``scarches_fl_cli.site``). The flow of ``site map`` is in :mod:`site_agent.agent`; pull-and-verify
in :mod:`site_agent.verify`; mapping with the model library in :mod:`site_agent.mapping`; the
privacy guard in :mod:`site_agent.guard`; the state directory and outbox in
:mod:`site_agent.state` and :mod:`site_agent.outbox`; YAML configuration in
:mod:`site_agent.config`; key rotation in :mod:`site_agent.rotation`. The Flower ClientApp for
federated reference training (an explicit opt-in) is :mod:`site_agent.federated_client`.

Nothing is imported here, so ``import site_agent`` stays cheap.
"""

__all__: list[str] = []
