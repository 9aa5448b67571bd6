# A site admin's agent: pulls and verifies the reference, maps private data locally, and sends
# back only signed condition weights. CPU torch via constraints.txt. Build from the repo root:
#   docker build -f docker/site-agent.Dockerfile -t scarches-fl-site .
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
COPY site_agent ./site_agent
COPY scarches_fl_cli ./scarches_fl_cli
RUN pip install --no-cache-dir -c constraints.txt '.[model]' \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin site \
    && mkdir -p /state /keys /data /out && chown site /state /keys /out

USER 10001
# /keys holds site.key (made by `site keygen` inside the container; it never leaves), /state the
# last verified checkpoint, outbox and receipts, /data the site's private h5ad (read-only),
# /out the mapped h5ad (embedding and labels stay here).
VOLUME ["/state", "/keys", "/out"]
HEALTHCHECK --interval=60s --timeout=10s --retries=3 \
    CMD ["scarches-fl", "site", "status", "--state", "/state"]
ENTRYPOINT ["scarches-fl"]
CMD ["site", "status", "--state", "/state"]
