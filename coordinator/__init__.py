"""The consortium operator's coordinator: durable ledger storage, the accept pipeline, the
registry gRPC server (TLS), and the Flower ServerApp for federated reference training.

Entry points:

* ``scarches-fl coordinator init | enroll | revoke | serve | status | backup | health``
  (command line in :mod:`scarches_fl_cli.coordinator`), implemented in :mod:`coordinator.admin`;
* :class:`coordinator.service.Registry` -- the accept pipeline and every read of a state
  directory; :class:`coordinator.server.RegistryServer` serves it over gRPC;
* :mod:`coordinator.storage` -- SQLite (WAL) + content-addressed blobs, crash-safe appends;
* :mod:`coordinator.config` -- ``coordinator.yaml``, validated with errors naming the field.

Nothing here imports torch: accepting and replaying updates is numpy only.
"""

__all__: list[str] = []
