#!/usr/bin/env bash
# Start Triton (background) on the built repository, wait until it is ready, then the gateway (foreground).
# Ctrl-C stops both. Called by `make demo`; ports and paths come from the environment (see Makefile).
set -euo pipefail
DYNGATE=${DYNGATE:-dyngate}
REPOSITORY=${REPOSITORY:-model_repository}
HTTP_PORT=${HTTP_PORT:-8000}; GRPC_PORT=${GRPC_PORT:-8001}; METRICS_PORT=${METRICS_PORT:-8002}
GATEWAY_PORT=${GATEWAY_PORT:-7860}

if curl -s -o /dev/null "http://127.0.0.1:$HTTP_PORT/"; then
  echo "something already listens on port $HTTP_PORT; stop it or run with HTTP_PORT=<free port>" >&2; exit 1
fi
"$DYNGATE" serve --repository "$REPOSITORY" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
  --metrics-port "$METRICS_PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT INT TERM

for _ in $(seq 1 240); do
  if curl -sf "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then echo "Triton exited; see the messages above" >&2; exit 1; fi
  sleep 0.5
done
curl -sf "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null || { echo "Triton did not become ready" >&2; exit 1; }
sleep 1
kill -0 $SERVER 2>/dev/null || { echo "our Triton exited (is another server on these ports?)" >&2; exit 1; }

echo
echo "Triton   HTTP http://127.0.0.1:$HTTP_PORT  gRPC 127.0.0.1:$GRPC_PORT  metrics http://127.0.0.1:$METRICS_PORT/metrics"
echo "Gateway  http://127.0.0.1:$GATEWAY_PORT"
echo
"$DYNGATE" gateway --repository "$REPOSITORY" --triton "127.0.0.1:$GRPC_PORT" --port "$GATEWAY_PORT" \
  --metrics-url "http://127.0.0.1:$METRICS_PORT/metrics"
