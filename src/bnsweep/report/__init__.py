"""The study report: results read from Optuna and MLflow, intervals, sentences, figures, Markdown/HTML."""
