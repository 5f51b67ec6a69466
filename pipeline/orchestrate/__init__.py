"""What every stage script does around its work: params, the MLflow run, timing, errors."""
