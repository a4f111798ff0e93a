#!/usr/bin/env bash
# A VILLAS-style experiment script: start a simulator, wait until it runs,
# let it run, stop it, and wait until it is idle again. Exits non-zero with
# the component's error message if anything goes wrong.
#
#   examples/run-dummy.sh [UUID] [SECONDS]
set -euo pipefail
uuid=${1:-3ddd318e-fee1-46d7-bff4-7c064d640d4e}   # the dummy of examples/lab.yaml
seconds=${2:-2}
busbar=${BUSBAR:-busbar}   # the busbar binary (a path may hold spaces)

"$busbar" action start --uuid "$uuid" --parameters '{runtime: 0.5}' --wait running --timeout 10
echo "running; letting it run for ${seconds}s"
sleep "$seconds"
"$busbar" action stop --uuid "$uuid" --wait idle --timeout 10
echo "done"
