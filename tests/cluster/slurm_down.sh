#!/usr/bin/env bash
# Stop the test cluster started by tests/cluster/slurm_up.sh (its jobs are cancelled first).
scancel --user="$(id -un)" >/dev/null 2>&1
pkill -x slurmd; pkill -x slurmctld; pkill -x munged
exit 0
