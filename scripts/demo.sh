#!/usr/bin/env bash
# Start Triton (`dyngate serve`, background) on the built repository, wait until it is ready, then the gateway.
# Ctrl-C stops both. When serve gives up (Triton died more often than it restarts it, or could not start), the
# gateway is stopped too and the demo ends with serve's reason (its error and Triton's log tail).
# Called by `make demo`; ports and paths come from the environment (see Makefile).
set -euo pipefail
DYNGATE=${DYNGATE:-dyngate}
REPOSITORY=${REPOSITORY:-model_repository}
HTTP_PORT=${HTTP_PORT:-8000}; GRPC_PORT=${GRPC_PORT:-8001}; METRICS_PORT=${METRICS_PORT:-8002}
GATEWAY_PORT=${GATEWAY_PORT:-7860}

# Every port is checked before anything starts (a taken gateway port used to fail only after Triton was up; `make
# demo` runs `demo.sh --check-ports` before its build too); the messages name every bad variable at once, the same
# for `make demo` and this script.
bad=0
for var in HTTP_PORT GRPC_PORT METRICS_PORT GATEWAY_PORT; do
  if ! [[ ${!var} =~ ^[0-9]+$ ]] || (( 10#${!var} < 1 || 10#${!var} > 65535 )); then
    echo "$var=${!var} is not a TCP port; use an integer in [1, 65535]: make demo $var=<free port>" >&2
    bad=1
  elif (exec 3<>"/dev/tcp/127.0.0.1/${!var}") 2>/dev/null; then
    echo "port ${!var} on 127.0.0.1 ($var) is already in use; stop what listens there or choose another:" \
      "make demo $var=<free port>" >&2
    bad=1
  fi
done
declare -A taken=()  # the four must differ: Triton binds three, the gateway the fourth
for var in HTTP_PORT GRPC_PORT METRICS_PORT GATEWAY_PORT; do
  if [ -n "${taken[${!var}]:-}" ]; then
    echo "$var=${!var} is the same port as ${taken[${!var}]}; the four ports must differ: make demo $var=<free port>" >&2
    bad=1
  else
    taken[${!var}]=$var
  fi
done
[ $bad = 0 ] || exit 1
[ "${1:-}" != "--check-ports" ] || exit 0
SERVE_OUT=$(mktemp -t dyngate-serve-XXXXXX.out)
GATEWAY=
stop_all() {
  kill -TERM $GATEWAY $SERVER 2>/dev/null || true
  wait 2>/dev/null || true
  rm -f "$SERVE_OUT"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

"$DYNGATE" serve --repository "$REPOSITORY" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
  --metrics-port "$METRICS_PORT" >"$SERVE_OUT" 2>&1 &
SERVER=$!
tail -n +1 -f --pid=$SERVER "$SERVE_OUT" &  # serve's messages as they come; it ends with serve

serve_stopped() {  # serve has exited: stop the gateway and end with serve's reason ($1: its status, if reaped)
  local code=${1:-0}
  [ $# -gt 0 ] || wait $SERVER || code=$?
  kill -TERM $GATEWAY 2>/dev/null || true
  sleep 0.5  # tail prints serve's last lines first
  echo >&2
  echo "dyngate serve stopped (exit status $code), so the demo stops (gateway included). serve said:" >&2
  # its error line only: serve's messages (Triton's log tail included) were shown above as they came
  if grep -q '^error: ' "$SERVE_OUT"; then grep -m1 '^error: ' "$SERVE_OUT" >&2; else tail -n 20 "$SERVE_OUT" >&2; fi
  exit 1
}

for _ in $(seq 1 240); do
  if curl -sf "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null; then break; fi
  kill -0 $SERVER 2>/dev/null || serve_stopped
  sleep 0.5
done
curl -sf "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null || { echo "Triton did not become ready" >&2; exit 1; }
sleep 1
kill -0 $SERVER 2>/dev/null || serve_stopped

echo
echo "Triton   HTTP http://127.0.0.1:$HTTP_PORT  gRPC 127.0.0.1:$GRPC_PORT  metrics http://127.0.0.1:$METRICS_PORT/metrics"
echo "Gateway  http://127.0.0.1:$GATEWAY_PORT"
echo
"$DYNGATE" gateway --repository "$REPOSITORY" --triton "127.0.0.1:$GRPC_PORT" --triton-http "127.0.0.1:$HTTP_PORT" --port "$GATEWAY_PORT" \
  --metrics-url "http://127.0.0.1:$METRICS_PORT/metrics" &
GATEWAY=$!
code=0
wait -n -p ENDED $SERVER $GATEWAY || code=$?
[ "$ENDED" != "$SERVER" ] || serve_stopped $code
exit $code  # the gateway ended; stop_all stops serve
