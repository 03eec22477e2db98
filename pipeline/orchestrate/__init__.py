"""Above the stages: the `mam2` command, the Prefect flow and its deployment, experiments over several
stage runs and the MLflow runs table. The only machinery that imports `stages`."""
