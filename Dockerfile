# One image for the Streamlit app (default command) and for training (`python train.py ...`,
# see the `train` service in docker-compose.yml). CPU only: no CUDA libraries in the image.
FROM python:3.11.14-slim-trixie

# PYTHONUNBUFFERED: logs reach `docker logs` at once (training progress, crashes).
# OMP/MKL threads: torch otherwise starts one thread per *host* core, which oversubscribes the
# one or two vCPUs of a small VM. Override per service (docker-compose.yml) or with `docker run -e`.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=2 \
    MKL_NUM_THREADS=2 \
    MODEL_PATH=models/model.pth \
    STREAMLIT_SERVER_HEADLESS=true \
    STREAMLIT_SERVER_FILE_WATCHER_TYPE=none \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false

WORKDIR /app

# Where the CPU build of torch comes from: PyTorch's own index, or a mirror of it
# (`docker build --build-arg TORCH_INDEX_URL=...`).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Dependency layer: changes only when requirements.txt changes, so code edits rebuild in seconds.
# torch comes first, from the CPU index, at the version pinned in requirements.txt (the image
# test imports it). The CPU wheel bundles its own libgomp, so no apt packages are needed. The
# second install finds the torch pin already satisfied (X.Y.Z+cpu matches ==X.Y.Z) and never
# pulls the CUDA build from PyPI. requirements.txt is the runtime only: pgserver (embedded
# PostgreSQL for `make run`) is in requirements-local.txt and stays out of the image.
COPY requirements.txt ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==$(sed -n 's/^torch==//p' requirements.txt)" \
    && pip install --no-cache-dir -r requirements.txt \
    && python -c "import torch; assert not torch.version.cuda, torch.version.cuda; print('torch', torch.__version__)"

# Non-root user with a fixed UID/GID 1000: bind-mounted ./models and ./data must be writable by
# it (`sudo chown -R 1000:1000 models data` on the host, done by deploy/setup-server.sh).
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin app

# Code layer (see .dockerignore for what stays out: data, checkpoints, venvs, .git, tests, .env).
COPY . .
RUN mkdir -p data models/checkpoints \
    && chown app:app data models models/checkpoints

# The "app" user created above (numeric, so runtimes can verify it is not root).
USER 1000:1000

EXPOSE 8501

# Docker only marks the container unhealthy (it does not kill or restart it), and the health
# endpoint is served by Streamlit's event loop, not the script thread, so a busy app still answers.
# Generous timeout and start period for a slow first start on a 1-vCPU VM; a 10 s interval
# (one short python process each time) so that `docker compose up --wait` returns soon after the
# app is ready (Docker 20.10 has no start_interval). python, not curl:
# the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://localhost:8501/_stcore/health', timeout=8); sys.exit(0 if r.read().strip() == b'ok' else 1)"]

CMD ["streamlit", "run", "app.py", "--server.address=0.0.0.0", "--server.port=8501", "--server.headless=true"]
