# Shared by pretrain_vit5.sh, finetune_vit5.sh and eval_vit5.sh (sourced, not run).
#
# The caller sets SCRIPT_USAGE, NEEDS_CKPT and WRITES_OUTPUT (0/1), sources this file with "$@", then
# builds its recipe as the array RECIPE and calls `launch`. After parsing:
#   SIZE (small|base|large), DATA_PATH, OUTPUT_DIR, CKPT, EXTRA (main.py flags after --)
# Every option has an environment variable of the same name in capitals.

fail() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

usage() {
  echo "usage: bash scripts/$(basename "$0") SIZE --data-path DIR [options] [-- extra main.py flags]"
  echo
  echo "$SCRIPT_USAGE"
  echo
  echo "  SIZE                 small | base | large"
  echo "  --data-path DIR      ImageNet folder with train/ and val/            (env DATA_PATH)"
  if [ "$WRITES_OUTPUT" = 1 ]; then
    echo "  --output-dir DIR     checkpoints and log.txt go here                 (env OUTPUT_DIR)"
    echo "                       default output/vit5_SIZE_$(basename "$0" _vit5.sh)"
  fi
  if [ "$NEEDS_CKPT" = 1 ]; then
    echo "  --ckpt CKPT          checkpoint file (evaluation: or a released tag) (env CKPT)"
  fi
  cat <<EOF
  --gpus N             processes (GPUs) per node, default 8            (env GPUS)
  --nnodes N           number of nodes, default 1                      (env NNODES)
  --node-rank R        this node's rank, default 0                     (env NODE_RANK)
  --master-addr HOST   rank-0 node's address, needed with --nnodes > 1 (env MASTER_ADDR)
  --master-port PORT   rendezvous port, default 29500                  (env MASTER_PORT)
  --max-restarts N     restart the whole group up to N times when a process fails,
                       default 0; add '-- --auto-resume' to continue from the newest
                       checkpoint (with --save-interval, mid-epoch)       (env MAX_RESTARTS)
  --dry-run            print the command without running it            (env DRY_RUN=1)
  -h, --help           this help

Flags after -- are appended to main.py's (a later flag overrides an earlier one).
Run it on every node with its own --node-rank (node 0 hosts the rendezvous). Set TORCHRUN to use
another launcher command (e.g. TORCHRUN='python -m torch.distributed.run'). SIGTERM or SIGUSR1 to torchrun reaches every process: they checkpoint the
step they agree on and exit with code 75.
EOF
}

SIZE=""
GPUS=${GPUS:-8} NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} DRY_RUN=${DRY_RUN:-0} MAX_RESTARTS=${MAX_RESTARTS:-0}
DATA_PATH=${DATA_PATH:-} OUTPUT_DIR=${OUTPUT_DIR:-} CKPT=${CKPT:-}
MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=${MASTER_PORT:-29500}
EXTRA=()

value() { [ $# -ge 2 ] && [ -n "$2" ] || fail "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --data-path) value "$@"; DATA_PATH=$2; shift ;;
    --output-dir) [ "$WRITES_OUTPUT" = 1 ] || fail "--output-dir is not an option of this script"
                  value "$@"; OUTPUT_DIR=$2; shift ;;
    --ckpt) [ "$NEEDS_CKPT" = 1 ] || fail "--ckpt is not an option of this script"; value "$@"; CKPT=$2; shift ;;
    --gpus) value "$@"; GPUS=$2; shift ;;
    --nnodes) value "$@"; NNODES=$2; shift ;;
    --node-rank) value "$@"; NODE_RANK=$2; shift ;;
    --master-addr) value "$@"; MASTER_ADDR=$2; shift ;;
    --master-port) value "$@"; MASTER_PORT=$2; shift ;;
    --max-restarts) value "$@"; MAX_RESTARTS=$2; shift ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) fail "unknown option $1 (see --help; main.py flags go after --)" ;;
    *) [ -z "$SIZE" ] || fail "unexpected argument $1 (see --help)"; SIZE=$1 ;;
  esac
  shift
done

case "$SIZE" in
  small|base|large) ;;
  "") fail "give the model size first: small, base or large (see --help)" ;;
  *) fail "unknown size '$SIZE': use small, base or large" ;;
esac
[ -n "$DATA_PATH" ] || fail "give --data-path DIR (or DATA_PATH=DIR)"
[ "$NEEDS_CKPT" = 1 ] && [ -z "$CKPT" ] && fail "give --ckpt CKPT (or CKPT=...)"
for var in GPUS NNODES; do
  [[ ${!var} =~ ^[1-9][0-9]*$ ]] || fail "$var must be a positive integer, got '${!var}'"
done
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || fail "MAX_RESTARTS must be a whole number, got '$MAX_RESTARTS'"
[[ $NODE_RANK =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] \
  || fail "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
[ "$NNODES" = 1 ] || [ -n "$MASTER_ADDR" ] || fail "--nnodes $NNODES needs --master-addr (rank 0's host)"
OUTPUT_DIR=${OUTPUT_DIR:-output/vit5_${SIZE}_$(basename "$0" _vit5.sh)}

# Print the command (copy-pasteable), then run it from the repository root unless DRY_RUN=1.
# Several nodes meet through c10d rendezvous hosted by node 0 (the static one cannot restart a group);
# restarts on one node use torchrun's --standalone c10d rendezvous on a free port.
launch() {
  local cmd
  read -ra cmd <<< "${TORCHRUN:-torchrun}"  # a command of several words, e.g. 'python -m torch.distributed.run'
  cmd+=(--nproc_per_node "$GPUS")
  if [ "$NNODES" != 1 ]; then
    cmd+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id vit5
          --rdzv-conf "is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)")
  elif [ "$MAX_RESTARTS" != 0 ]; then
    cmd+=(--standalone)
  elif [ "$MASTER_PORT" != 29500 ]; then
    cmd+=(--master_port "$MASTER_PORT")
  fi
  [ "$MAX_RESTARTS" = 0 ] || cmd+=(--max-restarts "$MAX_RESTARTS")
  cmd+=(main.py "${RECIPE[@]}" "${EXTRA[@]}")
  printf '%q ' "${cmd[@]}"
  echo
  [ "$DRY_RUN" = 1 ] && return 0
  # for torchrun: a restarted group gets a store of its own (sharing the agent's, it would find the failed
  # group's addresses there: pytorch/pytorch#135712); SLURM's SIGUSR1 is passed on to the workers like
  # SIGTERM; and they get 100 s to write the checkpoint of the step they stop at before a SIGKILL
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
  export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
  cd "$(dirname "$0")/.." && exec "${cmd[@]}"
}
