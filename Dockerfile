# One image for every service of ours in docker-compose.yml: `smi api` (the default), `smi worker`,
# `smi migrate`. Everything is installed while building; nothing is fetched when a container starts.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md worker.py ./
COPY smi smi
COPY workflows workflows
COPY activities activities
COPY api api
COPY emulator emulator
COPY templates templates
# Editable: the code stays in /app, where it finds templates/ beside it (smi/mail.py, api/status.py).
RUN pip install -e '.[postgres]' \
 && useradd --system --uid 10001 --home-dir /app smi \
 && mkdir -p /data/storage && chown -R smi /data
# /data is the storage volume; a new named volume takes this folder's owner, so `smi` may write.
USER smi
ENV SMI_ENV=production SMI_STORAGE_DIR=/data/storage SMI_API_HOST=0.0.0.0 SMI_API_PORT=8000
EXPOSE 8000
CMD ["smi", "api"]
