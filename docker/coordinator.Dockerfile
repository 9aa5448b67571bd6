# The consortium operator's coordinator: the registry server, the ledger and the blob store.
# No torch and no site agent: the coordinator accepts and replays updates with numpy
# (tests/coordinator/test_cli.py runs its commands with both unimportable). Build from the repo root:
#   docker build -f docker/coordinator.Dockerfile -t scarches-fl-coordinator .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

WORKDIR /opt/scarches-fl
COPY pyproject.toml constraints.txt README.md ./
COPY scarches_fl ./scarches_fl
COPY protocols ./protocols
COPY coordinator ./coordinator
COPY scarches_fl_cli ./scarches_fl_cli
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin operator \
    && mkdir -p /state && chown operator /state

USER 10001
# The state directory (SQLite ledger, blobs, keys, TLS material) lives on a volume; no secret is
# baked into the image: `coordinator init` creates them inside the volume.
VOLUME ["/state"]
EXPOSE 7443
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["scarches-fl", "coordinator", "health", "--dir", "/state"]
ENTRYPOINT ["scarches-fl"]
CMD ["coordinator", "serve", "--dir", "/state", "--listen", "0.0.0.0:7443"]
