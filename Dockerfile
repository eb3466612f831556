# syntax=docker/dockerfile:1
# Build wheels with a compiler, run them in a slim image without one.
FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir --upgrade pip wheel
COPY setup.cfg pyproject.toml README.md LICENSE ./
COPY proto ./proto
COPY gateway ./gateway
COPY core ./core
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8888 \
    DATA_DIR=/var/lib/gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels tornado-gateway \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway
USER gateway
EXPOSE 8888
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8888'), timeout=2)"]
ENTRYPOINT ["python", "-m", "gateway"]
