"""Does GradSim predict ripple? Pair table, statistics, plots, report, W&B, cross-model comparison."""
