"""MLflow: the run writer (few requests per run) and the local tracking server. Depends on nothing else of bnsweep."""
