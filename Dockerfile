# The one image of Kinora: `kinora api`, `kinora worker` and `kinora db upgrade` all
# run from it (docker-compose.yml). The wheels of every dependency (PyAV with its
# FFmpeg, Pillow, psycopg) are self-contained, so the slim base needs nothing more.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 kinora
WORKDIR /app

# Dependencies first, at the versions in requirements.lock: this layer is rebuilt only
# when pyproject.toml or the lock changes.
COPY pyproject.toml README.md requirements.lock ./
RUN mkdir -p backend/kinora && touch backend/kinora/__init__.py \
    && pip install -c requirements.lock -e '.[app]' && rm -rf backend

# The migrations travel inside the package (kinora/core/migrations).
COPY backend ./backend
RUN pip install --no-deps -e . \
    && mkdir -p /data && chown kinora:kinora /data

USER kinora
ENV KINORA_VAR_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
CMD ["kinora", "api", "--host", "0.0.0.0", "--port", "8000"]
