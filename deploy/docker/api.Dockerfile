# The api service image: the Albert gateway (`albert api`), small, non-root.
# Build context, either:
#   - the repository (the pipeline: docker build -f deploy/docker/api.Dockerfile .): the first
#     stage builds the wheels from the source, with the package index;
#   - a folder holding wheels/ = the pyalbert wheel and its [api] dependencies, made on the build
#     machine, for builders without network (pip wheel --wheel-dir CTX/wheels '.[api]').
# BASE may be any image with python3 (>= 3.10) and pip, e.g. a debootstrap image with python3-pip.
# The deploy runs the container as the deploy user (--user), who owns the mounted files.
# The deploy passes the arguments (pyalbert.commands.api.serve_args): --env, --config-dir,
# --backends, --keys, --whitelist, --port, --workers (api.workers of the environment).
ARG BASE=python:3.11-slim
FROM ${BASE} AS wheels
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /src
RUN if [ -d /src/wheels ]; then cp -r /src/wheels /wheels; \
    else python3 -m pip wheel --quiet --wheel-dir /wheels "/src[api]"; fi

FROM ${BASE}

ARG ALBERT_REVISION=unknown
ARG PIP_ARGS="--no-index --find-links /tmp/wheels"
LABEL org.opencontainers.image.title="albert-api" \
      org.opencontainers.image.description="OpenAI-compatible gateway of Albert Deploy" \
      org.opencontainers.image.revision="${ALBERT_REVISION}" \
      albert.service="api"

# Debian's own python3 marks itself externally managed; this image has no other Python users.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

COPY --from=wheels /wheels/ /tmp/wheels/
RUN python3 -m pip install ${PIP_ARGS} "pyalbert[api]" \
 && rm -rf /tmp/wheels \
 && (getent passwd albert >/dev/null || useradd --system --uid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin albert) \
 && albert api --help >/dev/null

USER 10001
EXPOSE 8080
STOPSIGNAL SIGTERM
# Liveness on the --port of the command line (8080 when absent).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python3 -c "import urllib.request; a=open('/proc/1/cmdline').read().split(chr(0)); p=a[a.index('--port')+1] if '--port' in a else '8080'; urllib.request.urlopen('http://127.0.0.1:%s/health' % p, timeout=2)" || exit 1
ENTRYPOINT ["albert", "api"]
