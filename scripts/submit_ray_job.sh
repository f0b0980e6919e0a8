#!/usr/bin/env bash
# Submit a mergekit-evolve search to a running Ray cluster as a Ray job (docs/cluster.md).
#
#   scripts/submit_ray_job.sh --address http://HEAD:8265 [options] -- \
#       GENOME --storage-path /shared/runs/evo1 [mergekit-evolve options...]
#
# The job runs `python -m evolve ...` on the head node, inside a copy of --working-dir (this
# repository by default), and joins the cluster with `--ray-address auto` unless you pass one.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/submit_ray_job.sh [--address URL] [--working-dir DIR] [--python PY]
                                 [--env NAME=VALUE]... [--submission-id ID] [--no-wait]
                                 [--] GENOME --storage-path /SHARED/DIR [mergekit-evolve options]

Submits `PY -m evolve GENOME ...` (mergekit-evolve) as a Ray job and, unless --no-wait, follows
its log until it ends (exit 0: the search succeeded or was stopped; 1: the job failed).

  --address URL        the cluster's dashboard/jobs address, http://HEAD:8265
                       [default: $RAY_API_SERVER_ADDRESS, else an http:// $RAY_ADDRESS]
  --working-dir DIR    uploaded and used as the job's working directory [default: this repo]
  --python PY          the interpreter on the cluster that has evomerge's dependencies
                       [default: python]
  --env NAME=VALUE     an environment variable for the job and its workers (repeatable);
                       WANDB_API_KEY, WANDB_MODE, HF_TOKEN and HF_HOME are passed on when set
  --submission-id ID   name the job (for ray job status/logs/stop ID)
  --no-wait            return once the job is submitted

--storage-path must be an absolute path on a filesystem every node shares: the job runs in a
temporary copy of the working directory, and the workers read the task files mirrored there.
Resume a stopped search by submitting it again with --resume.
EOF
}

fail() { echo "error: $*" >&2; exit 2; }

json_string() {   # a JSON string literal for $1
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\t'/\\t}
  s=${s//$'\n'/\\n}
  printf '"%s"' "$s"
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
address=${RAY_API_SERVER_ADDRESS:-}
if [[ -z $address && ${RAY_ADDRESS:-} == http* ]]; then address=$RAY_ADDRESS; fi
working_dir=$repo
python=python
submission_id=
no_wait=
envs=()

while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --address) [[ $# -ge 2 ]] || fail "--address: needs a value"; address=$2; shift 2 ;;
    --address=*) address=${1#*=}; shift ;;
    --working-dir) [[ $# -ge 2 ]] || fail "--working-dir: needs a value"; working_dir=$2; shift 2 ;;
    --working-dir=*) working_dir=${1#*=}; shift ;;
    --python) [[ $# -ge 2 ]] || fail "--python: needs a value"; python=$2; shift 2 ;;
    --python=*) python=${1#*=}; shift ;;
    --env) [[ $# -ge 2 ]] || fail "--env: needs NAME=VALUE"; envs+=("$2"); shift 2 ;;
    --env=*) envs+=("${1#*=}"); shift ;;
    --submission-id) [[ $# -ge 2 ]] || fail "--submission-id: needs a value"; submission_id=$2; shift 2 ;;
    --submission-id=*) submission_id=${1#*=}; shift ;;
    --no-wait) no_wait=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
evolve_args=("$@")

if [[ ${#evolve_args[@]} -eq 0 ]]; then
  usage >&2
  fail "missing GENOME and mergekit-evolve options (see --help)"
fi
[[ -n $address ]] || fail "--address: missing; give the Ray jobs address of the head node, e.g. --address http://HEAD:8265 (or export RAY_API_SERVER_ADDRESS)"
[[ $address == *://* ]] || address="http://$address"
hostport=${address#*://}
hostport=${hostport%%/*}
host=${hostport%:*}
port=${hostport##*:}
[[ $host != "$hostport" && $port =~ ^[0-9]+$ ]] || fail "--address: '$address' is not http://HOST:PORT (the dashboard port, 8265 by default)"
host=${host#[}; host=${host%]}
if ! timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" 2>/dev/null; then
  fail "--address: nothing answers at $host:$port; start the head node (ray start --head --dashboard-host 0.0.0.0 ...) or fix the address"
fi
[[ -d $working_dir ]] || fail "--working-dir: '$working_dir' is not a folder"

storage=
has_ray_address=
for ((i = 0; i < ${#evolve_args[@]}; i++)); do
  case ${evolve_args[i]} in
    --storage-path) storage=${evolve_args[i+1]:-} ;;
    --storage-path=*) storage=${evolve_args[i]#*=} ;;
    --ray-address|--ray-address=*) has_ray_address=1 ;;
  esac
done
[[ -n $storage ]] || fail "--storage-path: required; name a folder on storage every node shares"
[[ $storage == /* ]] || fail "--storage-path: '$storage' is relative; give an absolute path on storage every node shares (the job runs in a temporary copy of the working directory)"
[[ -n $has_ray_address ]] || evolve_args+=(--ray-address auto)

# The job's environment: PYTHONUNBUFFERED so the log streams; W&B/HF settings when set here.
env_json="\"PYTHONUNBUFFERED\": \"1\""
for name in WANDB_API_KEY WANDB_MODE WANDB_ENTITY WANDB_PROJECT HF_TOKEN HF_HOME \
            HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE; do
  if [[ -n ${!name:-} ]]; then env_json+=", $(json_string "$name"): $(json_string "${!name}")"; fi
done
for pair in ${envs[@]+"${envs[@]}"}; do
  [[ $pair == ?*=* ]] || fail "--env: '$pair' is not NAME=VALUE"
  env_json+=", $(json_string "${pair%%=*}"): $(json_string "${pair#*=}")"
done
runtime_env="{\"env_vars\": {$env_json}, \"excludes\": [\".git\", \".venv\", \"runs\", \"wandb\"]}"

cmd=(ray job submit --address "$address" --working-dir "$working_dir"
     --runtime-env-json "$runtime_env")
[[ -z $submission_id ]] || cmd+=(--submission-id "$submission_id")
[[ -z $no_wait ]] || cmd+=(--no-wait)
cmd+=(-- "$python" -m evolve "${evolve_args[@]}")
exec "${cmd[@]}"
