# softserve on a GPU host: the relabel worker and the batch server (see docker-compose.yml).
# PyPI's torch wheels for x86_64 bundle CUDA, so the NVIDIA container toolkit on the host
# is all the image needs: run with `--gpus all` (compose: see docker-compose.yml).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN pip install torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/softserve
COPY pyproject.toml README.md ./
COPY softserve ./softserve
COPY storage ./storage
COPY worker ./worker
COPY service ./service
COPY clients ./clients
RUN pip install . && useradd --create-home softserve

USER softserve
WORKDIR /work
ENTRYPOINT ["softserve"]
CMD ["--help"]
