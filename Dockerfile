# driverscore images. Build: docker build -t driverscore .        (the full image)
#                            docker build --target serving -t driverscore-serving .
# Run:   docker run -p 8080:8080 -e DRIVERSCORE_SERVICE__TOKENS='["..."]' driverscore
# SageMaker runs the image as `docker run <image> serve`: the entrypoint is the CLI, so
# `serve` is `driverscore serve` (GET /ping, POST /invocations on port 8080); with
# DRIVERSCORE_SERVICE__MODEL_DIR=/opt/ml/model it serves the model SageMaker put there
# (docs/deployment.md).
#
# BASE is any Debian-based image with python3 (3.11) and CA certificates: the public python
# image by default; scripts/container.sh builds one from Debian's packages and passes it.
# Every stage below runs unchanged on both.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build-base
# The versions come from the committed uv.lock, as for `make install`: runtime dependencies
# only (no dev extra), the package itself installed (not editable) into /opt/venv.
# UV_SYSTEM_CERTS: uv trusts the system's CA certificates (as pip and apt do), which is
# where a proxy's CA is installed.
ENV UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON=python3 UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1 \
    UV_SYSTEM_CERTS=1
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY scripts/lockfile.py ./scripts/
# uv as the lock pins it (its wheel's hash checked): no pip needed in the base.
RUN python3 scripts/lockfile.py uv /usr/local/bin/uv

# Dependencies in stages of their own (scripts/container.sh keeps them as its layer
# cache), reused while only the source or the README changes.
FROM build-base AS deps
RUN uv sync --frozen --no-install-project

FROM build-base AS deps-serving
# The same lock without what only training needs (scripts/lockfile.py serving-excludes).
RUN uv sync --frozen --no-install-project $(python3 scripts/lockfile.py serving-excludes)

FROM deps AS build
COPY README.md ./
COPY src ./src
RUN uv sync --frozen --no-editable

FROM deps-serving AS build-serving
COPY README.md ./
COPY src ./src
RUN uv sync --frozen --no-editable $(python3 scripts/lockfile.py serving-excludes)

FROM ${BASE} AS runtime-base
# libgomp: OpenMP runtime used by onnxruntime and scikit-learn.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 driverscore \
    && useradd --system --uid 10001 --gid driverscore --home-dir /var/lib/driverscore \
       --create-home driverscore
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    DRIVERSCORE_HOME=/var/lib/driverscore \
    DRIVERSCORE_SERVICE__HOST=0.0.0.0 \
    DRIVERSCORE_SERVICE__PORT=8080
USER 10001:10001
WORKDIR /var/lib/driverscore
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["driverscore"]
CMD ["serve"]

# The serving image: `serve` only (REST, SageMaker contract, the stream processor), models
# from the registry or a model directory; training, Dagster and the MLflow server left out.
FROM runtime-base AS serving
COPY --from=build-serving /opt/venv /opt/venv

# The full image (the default target): every command, training and Dagster included.
FROM runtime-base AS runtime
COPY --from=build /opt/venv /opt/venv
