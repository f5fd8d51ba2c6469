#!/usr/bin/env bash
# Starts `gemma serve` on a loopback port, runs scripts/openai_client_check.py against it with
# the official openai client (dev venv, created on first use), then stops the server.
# Usage: scripts/openai_client_check.sh [PORT]
set -euo pipefail
port=${1:-18090}
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${OPENAI_VENV:-$HOME/.venvs/openai}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q openai jsonschema
fi
cargo build --release -p gemma-cli --manifest-path "$root/Cargo.toml"
"$root/target/release/gemma" serve --port "$port" --parallel 2 --ctx-size 2048 -q &
server=$!
trap 'kill -TERM $server; wait $server' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
  sleep 0.2
done
"$venv/bin/python" "$root/scripts/openai_client_check.py" "http://127.0.0.1:$port/v1"
