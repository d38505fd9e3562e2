#!/usr/bin/env bash
# multiteach on SLURM: 2 nodes x 8 GPUs, FSDP2 through Accelerate (examples/multinode/README.md).
#
#   sbatch examples/multinode/slurm.sh RECIPE [key=value ...]
#
# One `srun` task per node runs `accelerate launch`, which starts the 8 GPU workers of that node. Re-submitting
# the same command (or SLURM requeueing it after a preemption) resumes from the run directory's last complete
# checkpoint: output_dir must be on a filesystem every node sees (rank 0 writes checkpoints, every rank
# reads them when resuming).
#
#SBATCH --job-name=multiteach
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64           # data loading + 8 workers; adjust to the node
#SBATCH --time=24:00:00
#SBATCH --requeue                    # put the job back in the queue when preempted
#SBATCH --signal=TERM@300            # SIGTERM 5 min before the time limit: the loop checkpoints and exits
#SBATCH --output=%x-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch examples/multinode/slurm.sh RECIPE [key=value ...]}
shift

# Where to launch from (sbatch copies the script elsewhere, so use the submission directory).
cd "${SLURM_SUBMIT_DIR}"

export GPUS_PER_NODE=8
# The first node of the allocation hosts the rendezvous; a port derived from the job id avoids clashes
# between jobs sharing a node.
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=8             # per worker; the CPUs of a node are shared by its 8 workers
export HF_HUB_OFFLINE=1              # teachers come from the shared Hugging Face cache (HF_HOME), never the net
export PYTHONUNBUFFERED=1
# After forwarding SIGTERM, torch's launcher (under accelerate launch) waits this long before SIGKILL; the
# default 30 s may not cover finishing the step plus gathering and writing a ViT-g checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240

echo "job ${SLURM_JOB_ID}: ${SLURM_NNODES} nodes x ${GPUS_PER_NODE} GPUs, rendezvous ${MASTER_ADDR}:${MASTER_PORT}"

# Single quotes: SLURM_NODEID (the machine rank) differs per node, so it is read inside each srun task.
# train.distributed.strategy=fsdp matches the Accelerate config's distributed_type (a mismatch is refused);
# the user's overrides come after it and win.
srun --kill-on-bad-exit=1 bash -c '
  exec accelerate launch \
    --config_file examples/multinode/accelerate_fsdp.yaml \
    --num_machines "${SLURM_NNODES}" \
    --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))" \
    --machine_rank "${SLURM_NODEID}" \
    --main_process_ip "${MASTER_ADDR}" \
    --main_process_port "${MASTER_PORT}" \
    -m multiteach train "$@"
' multiteach "${RECIPE}" train.distributed.strategy=fsdp "$@"
