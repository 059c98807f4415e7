#!/usr/bin/env bash
# Submit `contrast train` to a running Ray cluster through its job server, and follow its logs.
#   launch/submit.sh CONFIG [KEY=VALUE ...]
# CONFIG: a local file (uploaded with the job, so local edits apply without rebuilding the image),
#   or a path inside the image (/app/configs/vitb32_laion.yaml) or a URL every node can read (s3://…).
# RAY_ADDRESS: the job server, default http://127.0.0.1:8265. Reach a remote head on that port with
#   `ray dashboard launch/ray-cluster.yaml`, `kubectl port-forward svc/HEAD-svc 8265:8265` or
#   `ssh -L 8265:127.0.0.1:8265 HEAD`; with token authentication export RAY_AUTH_MODE and RAY_AUTH_TOKEN.
# Extra `ray job submit` flags go in RAY_JOB_FLAGS, e.g. RAY_JOB_FLAGS="--no-wait --submission-id vit-b32".
set -euo pipefail

if (( $# < 1 )); then
    sed -n '3,4p' "$0" >&2
    exit 2
fi
config=$1
shift

flags=()
if [[ -f $config ]]; then
    job_dir=$(mktemp -d)
    trap 'rm -rf "$job_dir"' EXIT
    cp "$config" "$job_dir/run.yaml"
    flags+=(--working-dir "$job_dir")
    config=run.yaml
fi
read -r -a extra <<< "${RAY_JOB_FLAGS:-}"

# ${a[@]+"${a[@]}"}: an empty array under `set -u` in the bash 3.2 of macOS laptops
ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" ${flags[@]+"${flags[@]}"} ${extra[@]+"${extra[@]}"} \
    -- contrast train "$config" cluster.address=auto "$@"
