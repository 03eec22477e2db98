"""Infrastructure every stage uses: params, atomic outputs and locks, stores, the training loop, MLflow runs,
the stage registry and the stage command line. Imports only `models` and itself."""
