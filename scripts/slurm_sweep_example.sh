#!/usr/bin/env bash
# Example: a sweep as a plain SLURM job array, one array task per sweep point, for clusters
# where hydra-submitit-launcher is not wanted (`launcher=slurm` does the same from Hydra).
# Each task runs one xmodal job in its deterministic run directory, so resubmitting the array
# skips finished points and redoes failed or preempted ones (resume=auto). A training run that
# gets SIGUSR2 (--signal, before the time limit) saves checkpoints/last.ckpt at the end of the
# current batch and requeues its array task, which continues exactly there (resume=auto); on
# SIGTERM (preemption, scancel) it saves and stops, and SLURM decides whether it comes back.
#
#   sbatch scripts/slurm_sweep_example.sh
#
#SBATCH --job-name=xmodal-sweep
#SBATCH --array=0-11
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # = trainer.devices
#SBATCH --gpus-per-node=1            # = trainer.devices
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=USR2@120            # xmodal saves last.ckpt and requeues the task on this signal
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail

# the sweep: 4 methods x 3 seeds (edit to taste)
experiments=(uclip/coco_mcd_top1_similarity uclip/coco_mcd_top1_consistency \
             uclip/coco_mcd_adversarial uclip/coco_mcd_adversarial_linear)
seeds=(0 1 2)
i=${SLURM_ARRAY_TASK_ID:-0}
exp=${experiments[$((i / ${#seeds[@]}))]}
seed=${seeds[$((i % ${#seeds[@]}))]}

srun xmodal-eval "experiment=${exp}" "seed=${seed}" trainer=gpu resume=auto
