# Sourced by the sbatch scripts in this folder; runs once, in the batch step on the allocation's first node.
#
# Sets and exports what every rank needs, derived once from the job so that all ranks agree:
#   MASTER_ADDR  address of the allocation's first node (its NodeAddr: the node name unless slurm.conf sets one)
#   MASTER_PORT  10000 + SLURM_JOB_ID % 20000 (the formula of moetrain.runtime.slurm.master_port)
#   RUN_DIR      $MOETRAIN_OUTPUTS/slurm-$SLURM_JOB_ID (MOETRAIN_OUTPUTS default: outputs), or the
#                hydra.run.dir=... given among the arguments
# and TRAIN_ARGS: the arguments of the script (recipe + overrides), with hydra.run.dir=$RUN_DIR added.
# PYTHON (default: .venv/bin/python of the submit folder) is the interpreter that runs launch/train.py.

die() { echo "error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "no SLURM_JOB_ID: submit this script with sbatch (see docs/slurm.md)"
MOETRAIN_ROOT=${MOETRAIN_ROOT:-$SLURM_SUBMIT_DIR}
cd "$MOETRAIN_ROOT" || die "MOETRAIN_ROOT=$MOETRAIN_ROOT is not a folder"
[ -f launch/train.py ] || die "MOETRAIN_ROOT=$MOETRAIN_ROOT has no launch/train.py: submit from the repository root"
PYTHON=${PYTHON:-$MOETRAIN_ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || die "PYTHON=$PYTHON is not executable; set PYTHON=/path/to/venv/bin/python"

RUN_DIR=${MOETRAIN_OUTPUTS:-outputs}/slurm-$SLURM_JOB_ID
TRAIN_ARGS=()
for arg in "$@"; do
  case "$arg" in
    -m | --multirun) die "$arg: an sbatch job is one run; sweep with hydra/launcher=slurm (docs/slurm.md)" ;;
    hydra.run.dir=*) RUN_DIR=${arg#hydra.run.dir=} ;;
    *) TRAIN_ARGS+=("$arg") ;;
  esac
done
TRAIN_ARGS+=("hydra.run.dir=$RUN_DIR")

first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node -o "$first_node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export MASTER_ADDR=${MASTER_ADDR:-$first_node}
export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))

export RUN_DIR
echo "job $SLURM_JOB_ID: $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT, run folder $RUN_DIR"
