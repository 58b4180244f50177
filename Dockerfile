# softserve on a GPU host: two images from one file (see docker-compose.yml and the README's
# deployment guide).
#   docker build --target server -t softserve-server .   # CPU only, no torch: serves a store
#   docker build --target worker -t softserve-worker .   # CUDA torch: relabels on the GPUs
# The worker's torch comes from TORCH_INDEX_URL: PyPI's default build by default; for the
# host's driver pick e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# Both run as a non-root user whose UID/GID (build args) should own the store on the host.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UID=1000
ARG GID=1000

FROM ${PYTHON_IMAGE} AS base
ARG UID
ARG GID
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SOFTSERVE_STORE=/store
RUN groupadd --gid "${GID}" softserve \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /usr/sbin/nologin softserve \
    && mkdir /store \
    && chown softserve:softserve /store
WORKDIR /opt/softserve
COPY pyproject.toml README.md ./
COPY scripts/requirements.py ./scripts/
COPY softserve ./softserve
COPY storage ./storage
COPY worker ./worker
COPY service ./service
COPY clients ./clients

# The server: its extra's requirements without torch (it imports none), then softserve.
FROM base AS server
ARG UID
ARG GID
RUN python scripts/requirements.py server --without torch > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps . \
    && rm /tmp/requirements.txt
USER ${UID}:${GID}
WORKDIR /home/softserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('SOFTSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["softserve"]
CMD ["serve", "--host", "0.0.0.0"]

# The worker: torch and torchvision from TORCH_INDEX_URL (the CUDA build for the host's
# driver), then the worker's other requirements and softserve.
FROM base AS worker
ARG UID
ARG GID
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && python scripts/requirements.py worker --without torch --without torchvision \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps . \
    && rm /tmp/requirements.txt
USER ${UID}:${GID}
WORKDIR /home/softserve
# healthy while the container sees a GPU: a relabel on a host whose GPU went away is not
HEALTHCHECK --interval=60s --timeout=30s --start-period=60s --retries=2 \
    CMD ["python", "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"]
ENTRYPOINT ["softserve"]
CMD ["--help"]
