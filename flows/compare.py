"""`r1 compare`: key metrics of stage runs side by side, from MLflow (the MLflow UI's compare view has the plots)."""

from __future__ import annotations

from stages.core import tracking

KEY_METRICS = ("eval/pass_at_1", "eval/greedy_accuracy", "eval/format_rate", "eval/language_consistency",
               "eval/mean_completion_tokens")


def compare_rows(recipe, stage: str | None = None, pipeline_run_id: str | None = None, limit: int = 20,
                 metrics: tuple[str, ...] = KEY_METRICS) -> list[dict]:
    """One dict per finished stage run (newest first): run id, stage, start time, the chosen metrics."""
    import datetime

    import mlflow

    tracking.setup(recipe.tracking)
    exp = mlflow.get_experiment_by_name(recipe.tracking.experiment)
    filters = [f"tags.`{tracking.STAGE_TAG}` != 'pipeline'"]
    if stage:
        filters.append(f"tags.`{tracking.STAGE_TAG}` = '{stage}'")
    if pipeline_run_id:
        filters.append(f"tags.`{tracking.PIPELINE_TAG}` = '{pipeline_run_id}'")
    runs = mlflow.search_runs([exp.experiment_id], filter_string=" and ".join(filters),
                              order_by=["attributes.start_time DESC"], max_results=limit, output_format="list")
    rows = []
    for r in runs:
        started = datetime.datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        rows.append({"run": r.info.run_id[:8], "stage": r.data.tags.get(tracking.STAGE_TAG, "?"),
                     "started": started, "status": r.info.status,
                     **{m: r.data.metrics.get(m) for m in metrics}})
    return rows
