"""Launch one stage's entry point on the target the recipe's `cluster` names, and hand back its outputs.

A Prefect stage task calls `launch_stage(...)`; what runs is always `python -m stages.entry NAME --recipe R --overrides
JSON --inputs JSON --parent-run-id ID --result-file F`, and rank 0 writes the stage outputs (run id, artifact URIs) to F:

  local       in this process: `stages.registry.runnable()[NAME](recipe, ...)`, no subprocess
  torchrun    `torchrun --nproc-per-node N -m stages.entry ...` on this node, output streamed line by line
  deepspeed   `deepspeed --hostfile H --num_nodes N --num_gpus G --module stages.entry ...` (hostfile = nodes over ssh)
  slurm       an sbatch script (`srun torchrun` with a c10d rendezvous on the first node), `sbatch --wait`
  kubernetes  a run of the `r1-stage` flow deployment on a Prefect Kubernetes work pool (infra/prefect/), one pod

Modules: `spec` (what to run and where), `commands` (entry point, torchrun and deepspeed command lines), `slurm`
(the sbatch script, requeued before the time limit), `kubernetes`, `supervise` (running the launcher, timeouts, a
failing rank's error), `cluster` (one stage at a time per cluster: a Prefect concurrency limit), `stage`
(`launch_stage`).
Multi-node targets need `workdir` on storage every node sees (rank 0 writes the result file there). See docs/scaling.md.
"""

from flows.launch.spec import LaunchError, LaunchSpec
from flows.launch.stage import launch_stage

__all__ = ["LaunchError", "LaunchSpec", "launch_stage"]
