#!/usr/bin/env bash
# Segment a cohort on SLURM: this small job runs the wsi-ircr driver, which starts and stops
# GPU worker jobs through dask-jobqueue as tiles wait (configs/cluster/slurm.yaml).
#
#   pip install "wsi-ircr[cluster]"        # in the environment the worker jobs activate
#   cp configs/cluster/slurm.yaml my_slurm.yaml   # set queue, account, gpus, setup lines
#   sbatch pipelines/slurm_cohort.sh /shared/slides /shared/out my_slurm.yaml
#
# Rerunning the same sbatch line after a crash, a timeout or a failed slide skips finished
# slides and resumes the others at tile level; OUT/cohort.csv lists every slide's status.
# Slides, model and OUT must be on a filesystem the worker nodes share.
#SBATCH --job-name=wsi-ircr-driver
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=24:00:00
set -euo pipefail

SLIDES=${1:?usage: sbatch slurm_cohort.sh SLIDES_FOLDER_OR_LIST OUT [SLURM_YAML]}
OUT=${2:?usage: sbatch slurm_cohort.sh SLIDES_FOLDER_OR_LIST OUT [SLURM_YAML]}
SLURM_YAML=${3:-configs/cluster/slurm.yaml}

if [[ -f "$SLIDES" && "$SLIDES" == *.txt ]]; then
    INPUT=(--list "$SLIDES")
else
    INPUT=("$SLIDES")
fi
wsi-ircr segment "${INPUT[@]}" -o "$OUT" --device cuda --cluster slurm --cluster-config "$SLURM_YAML"
