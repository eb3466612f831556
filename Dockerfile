# syntax=docker/dockerfile:1
# The gateway image: wheels are built with a compiler in the first stage; the
# runtime stage installs only those wheels and has no compiler.
#
#   docker build -t tornado-gateway .
#   docker run -p 8888:8888 -e REDIS_URL=... -e DATABASE_URL=... -e JWT_SECRET=... tornado-gateway
#
# The same image runs the standalone REST core: `--entrypoint python ... -m core`
# (docker-compose.yml and deploy/k8s/base/core.yaml do this). See docs/deploy.md.

FROM python:3.11-slim AS build
# The build stage is thrown away, so its compiler's exact Debian version does
# not matter; pinning one would break the build at every Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Exactly what `pip wheel .` needs: setup.cfg reads README.md and LICENSE.
COPY setup.cfg pyproject.toml README.md LICENSE ./
COPY proto ./proto
COPY gateway ./gateway
COPY core ./core
# One wheel for the project and one for each dependency, versions resolved here.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8888 \
    DATA_DIR=/var/lib/gateway
# The wheels are bind-mounted from the build stage, so none of them stays in
# a layer; --no-index: nothing is resolved or downloaded at this point.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/gateway \
       --create-home --shell /usr/sbin/nologin gateway
# A numeric user, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/gateway
EXPOSE 8888
# SIGTERM drains: readiness turns red, sockets close with 4000 over
# DRAIN_SECONDS, everything stops within SHUTDOWN_TIMEOUT (+5 s with workers).
STOPSIGNAL SIGTERM
# Slim images have no curl; the standard library does the probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8888'), timeout=2)"]
# `run` starts WORKERS gateway processes on PORT; the default WORKERS=0 means
# one per core this process may run on, which in a container with a CPU limit
# is every core of the node, not the limit: set WORKERS to the CPU limit
# (deploy/k8s/base/configmap.yaml does). Other subcommands: `token`, `keygen`.
ENTRYPOINT ["python", "-m", "gateway"]
CMD ["run"]
