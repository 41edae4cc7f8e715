# One image for the API and the workers: `smi api`, `smi worker`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md worker.py ./
COPY smi smi
COPY workflows workflows
COPY activities activities
COPY api api
COPY emulator emulator
COPY templates templates
RUN pip install --no-cache-dir '.[postgres]'
ENV SMI_ENV=production SMI_STORAGE_DIR=/data/storage
EXPOSE 8000
CMD ["smi", "api"]
