"""The machinery every stage shares, below the stage modules (which import it; it never imports them).

Layers, each importing only the ones above it in this list:
- order (stage names, order and inputs), config_base, tasks, tokenizer, jsonio, console (logging, stage lines,
  progress), pyfunc_model (a stage's model as an MLflow pyfunc; stands alone): leaves;
- sft (the SFT loop and its config), configs (each stage's config), recipe (the whole run's config);
- data (sources, the held-out split, CoT sets), heldout (evaluation problems, prompts as GRPO builds them,
  pretraining texts);
- tracking, models, distributed, attempts, evaluate, benchmarks, rejection;
- lineage (stage key, inputs, reuse, model registry), context (a stage's run and work dir, its finish);
- grpo_runner and sft_runner (the training ends the stages share), preflight (checks before any model loads).
"""
