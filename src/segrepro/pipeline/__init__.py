"""Running the workflow: per-stage code dependencies, the controller's helpers, the planner and
MLflow tracking."""
