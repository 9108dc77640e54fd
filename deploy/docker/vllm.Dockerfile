# The vllm service image: the upstream vLLM OpenAI server image, labelled and health-checked.
# The deploy passes the server arguments (pyalbert.commands.vllm.server_args) as the container
# command; models are mounted read-only under /models. Build: docker build -f
# deploy/docker/vllm.Dockerfile --build-arg BASE=vllm/vllm-openai:v0.6.3 .
ARG BASE=vllm/vllm-openai:v0.6.3
FROM ${BASE}

ARG ALBERT_REVISION=unknown
LABEL org.opencontainers.image.title="albert-vllm" \
      org.opencontainers.image.description="vLLM OpenAI server for Albert Deploy" \
      org.opencontainers.image.revision="${ALBERT_REVISION}" \
      albert.service="vllm"

ENV VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1

# Weights are on the host's storage dir, never fetched by the server. The health check reads
# the server's --port from its command line.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
  CMD python3 -c "import urllib.request; a=open('/proc/1/cmdline').read().split(chr(0)); p=a[a.index('--port')+1] if '--port' in a else '8000'; urllib.request.urlopen('http://127.0.0.1:%s/health' % p, timeout=4)" || exit 1

ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
