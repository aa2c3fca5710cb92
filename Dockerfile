# syntax=docker/dockerfile:1
# Multi-stage: build a virtual environment from the lock file, copy it into a slim runtime that
# runs as a non-root user. The base image is pinned by version; pin its digest in your registry.
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install uv==0.13.9 \
    && /opt/venv/bin/uv pip install --compile-bytecode --python /opt/venv/bin/python -r requirements.lock
COPY shared ./shared
COPY services ./services
COPY openapi ./openapi
COPY alembic.ini ./
# Bytecode compiled here: the runtime user cannot write it, and would compile every module at
# each start (the lazily imported ones during its first requests).
RUN /opt/venv/bin/uv pip install --compile-bytecode --python /opt/venv/bin/python --no-deps . \
    && /opt/venv/bin/pip uninstall -y uv

FROM python:3.11.14-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 abl && useradd --system --uid 10001 --gid abl abl
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/openapi /app/openapi
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 ABL_HOST=0.0.0.0
WORKDIR /app
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "services.cli"]
CMD ["serve", "--service", "all"]
