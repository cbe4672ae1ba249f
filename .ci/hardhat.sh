#!/usr/bin/env bash
# Start a throw-away Hardhat node on loopback for the chain conformance tests.
#
#   eval "$(.ci/hardhat.sh)"     # installs hardhat@2 once (outside the repo), starts the node,
#                                # and exports TELELEDGER_TEST_CHAIN_URL
#   kill "$(cat "$HH_DIR/node.pid")"   # stop it (the pid file path is printed on stderr)
#
# Settings (env): TELELEDGER_HARDHAT_DIR (npm cache folder, default ~/.cache/teleledger-hardhat),
# TELELEDGER_HARDHAT_PORT (default 8545), TELELEDGER_HARDHAT_WAIT (seconds, default 90).
# Only stdout carries the export line; everything else goes to stderr.
set -euo pipefail

HH_DIR="${TELELEDGER_HARDHAT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/teleledger-hardhat}"
PORT="${TELELEDGER_HARDHAT_PORT:-8545}"
WAIT="${TELELEDGER_HARDHAT_WAIT:-90}"
URL="http://127.0.0.1:${PORT}"
export HARDHAT_DISABLE_TELEMETRY_PROMPT=true

answers() {
  curl -sf -m 2 -H 'content-type: application/json' \
    -d '{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}' "$URL" 2>/dev/null | grep -q '"result"'
}

mkdir -p "$HH_DIR"
if [ ! -x "$HH_DIR/node_modules/.bin/hardhat" ]; then
  echo "installing hardhat@2 into $HH_DIR" >&2
  [ -f "$HH_DIR/package.json" ] || echo '{"name":"teleledger-hardhat","private":true}' > "$HH_DIR/package.json"
  (cd "$HH_DIR" && npm install --no-audit --no-fund --loglevel=error hardhat@2 >&2)
fi
# chainId 31337 is Hardhat's default, pinned so the tests can assert it; cancun matches the
# artifacts' evm_version (Vyper 0.4 emits MCOPY/TSTORE-era opcodes).
cat > "$HH_DIR/hardhat.config.js" <<'JS'
module.exports = { networks: { hardhat: { chainId: 31337, hardfork: "cancun" } } };
JS

if answers; then
  echo "a node already answers on $URL; reusing it" >&2
else
  # exec: no shell stays behind holding this script's stdout (the caller's $(...) would never end)
  (cd "$HH_DIR" && exec nohup ./node_modules/.bin/hardhat node --hostname 127.0.0.1 --port "$PORT" \
      > "$HH_DIR/node.log" 2>&1 < /dev/null) &
  echo $! > "$HH_DIR/node.pid"
  echo "hardhat node pid $(cat "$HH_DIR/node.pid") (pid file $HH_DIR/node.pid, log $HH_DIR/node.log)" >&2
  deadline=$((SECONDS + WAIT))
  until answers; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "hardhat node did not answer eth_chainId on $URL within ${WAIT}s; log:" >&2
      tail -n 40 "$HH_DIR/node.log" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
fi
echo "export TELELEDGER_TEST_CHAIN_URL=$URL"
