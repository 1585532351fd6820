-- Runs once, when the postgres container starts on an empty data volume (POSTGRES_DB already created `prefect`).
-- MLflow gets its own database so its migrations never touch Prefect's tables.
CREATE DATABASE mlflow;
