# The farm's images, one Dockerfile, two targets (docker-compose.yml builds both):
#   docker build --target service -t lora-farm:service .   # API, Flower, migrations: no torch (small, starts fast)
#   docker build --target worker  -t lora-farm:worker  .   # GPU workers: torch first, then the project's [worker] extra
# TORCH_INDEX_URL picks the torch build: a CUDA one for GPU hosts (default), https://download.pytorch.org/whl/cpu
# for CPU-only workers. A bare `pip install torch` would pick whatever the resolver likes; pinning it first keeps
# the project's install from replacing it.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FARM_HOME=/var/lib/farm \
    FARM_WORK_DIR=/var/lib/farm/work \
    FARM_CACHE_DIR=/var/cache/farm \
    FARM_MIGRATIONS_DIR=/opt/farm/migrations
RUN useradd --create-home --uid 1000 farm \
 && mkdir -p /var/lib/farm /var/cache/farm \
 && chown farm:farm /var/lib/farm /var/cache/farm
WORKDIR /opt/farm

FROM base AS service
COPY pyproject.toml README.md alembic.ini ./
COPY farm ./farm
COPY workers ./workers
COPY api ./api
COPY migrations ./migrations
RUN pip install .
USER farm
EXPOSE 8000 5555
CMD ["farm", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# torch first, in its own layer: rebuilding after a code change does not download it again.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md alembic.ini ./
COPY farm ./farm
COPY workers ./workers
COPY api ./api
COPY migrations ./migrations
RUN pip install ".[worker]"
USER farm
CMD ["farm", "worker", "--gpus", "all"]
