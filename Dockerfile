# One image for every service of ours in docker-compose.yml: `smi api` (the default), `smi worker`,
# `smi migrate`. Everything is installed while building, from the locks, every file checked against
# its hash; nothing is fetched when a container starts. The dev extra (the Temporal binaries, the SMTP
# sink) and the test extra are not installed. The base is an exact release (README "Production").
FROM python:3.11.14-slim-trixie
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# The dependencies first, a layer that changes only with the locks: pip and the build tools, then the
# locked packages, built with those tools (pyvips has no wheels) rather than with unchecked downloads.
COPY requirements-build.lock requirements.lock ./
RUN python -m pip install --require-hashes --no-deps -r requirements-build.lock \
 && pip install --require-hashes --no-build-isolation -r requirements.lock
COPY pyproject.toml README.md worker.py cli.py ./
COPY smi smi
COPY workflows workflows
COPY activities activities
COPY api api
COPY emulator emulator
COPY templates templates
# Editable: the code stays in /app, where it finds templates/ beside it (smi/mail.py, api/status.py).
# --no-index: every dependency is installed already; one missing from requirements.lock fails the build.
# Compiled now: the workflow sandbox imports workflows/ again for every job, and `smi` may not write .pyc
# files into /app (README, Benchmarks: compiling workflows/upscale.py from source cost 6 ms a job).
RUN pip install --no-index --no-build-isolation -e '.[postgres]' \
 && python -m compileall -q smi workflows activities api emulator worker.py cli.py \
 && useradd --system --uid 10001 --home-dir /app smi \
 && mkdir -p /data/storage && chown -R smi /data
# /data/storage: the files (local backend, a volume) or this container's scratch copies (s3); a new named
# volume takes this folder's owner, so `smi` may write.
USER smi
ENV SMI_ENV=production SMI_STORAGE_DIR=/data/storage SMI_API_HOST=0.0.0.0 SMI_API_PORT=8000
EXPOSE 8000
CMD ["smi", "api"]
