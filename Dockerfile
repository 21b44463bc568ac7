# driverscore scoring service. Build: docker build -t driverscore .
# Run:   docker run -p 8080:8080 -e DRIVERSCORE_SERVICE__TOKENS='["..."]' driverscore
# SageMaker runs the image as `docker run <image> serve`: the entrypoint is the CLI, so
# `serve` is `driverscore serve` (GET /ping, POST /invocations on port 8080).

FROM python:3.11-slim AS build
# The versions come from the committed uv.lock, as for `make install`: runtime dependencies
# only (no dev extra), the package itself installed (not editable) into /opt/venv.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy UV_NO_CACHE=1
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
# uv at the version the lock pins; dependencies in their own layer, reused while only the
# source changes.
RUN pip install "uv==$(awk '$0 == "name = \"uv\"" { getline; gsub(/[^0-9.]/, ""); print; exit }' uv.lock)" \
    && uv sync --frozen --no-install-project
COPY src ./src
RUN uv sync --frozen --no-editable

FROM python:3.11-slim AS runtime
# libgomp: OpenMP runtime used by onnxruntime and scikit-learn.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 driverscore \
    && useradd --system --uid 10001 --gid driverscore --home-dir /var/lib/driverscore \
       --create-home driverscore
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
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
