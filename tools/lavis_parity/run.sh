#!/usr/bin/env bash
# LAVIS parity in one command: LAVIS's reference in its own pinned venv, then the check in xllm's.
#   tools/lavis_parity/run.sh                              random weights of a small config
#   tools/lavis_parity/run.sh --checkpoint my_blip2.pth    your LAVIS / X-LLM checkpoint (bert-base shape)
# Then the whole stage-1 step (ITC + ITM + ITG) at BLIP-2's shape: LAVIS's losses and time beside xllm's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${LAVIS_VENV:-$here/.venv}
out=${LAVIS_OUT:-$here/out}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
  "$venv/bin/pip" install -q --no-deps salesforce-lavis==1.0.2
fi
"$venv/bin/python" "$here/make_reference.py" --out "$out" "$@"
make -C "$root" install
"$root/.venv/bin/python" "$here/check.py" --reference "$out" "$@"
"$venv/bin/python" "$here/stage1_reference.py" --out "$out/stage1" --repeats 5
"$root/.venv/bin/python" "$here/stage1_check.py" --reference "$out/stage1" --repeats 5
