"""MLflow: the run writer (few requests per run) and the local tracking server; below every other stage."""
