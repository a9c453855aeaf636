"""The stages of the R1 recipe, one module each (base_model, r1_zero, cold_start_sft, reasoning_rl, synthesize,
general_sft, preference_rl, distill), the registry that names them, and `entry`, a stage's process entry point. What
the stages share lives below them in `stages.core`."""
