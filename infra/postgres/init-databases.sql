-- Runs once, on the first start of an empty data volume: POSTGRES_DB (mlflow) exists already; Prefect gets its own.
CREATE DATABASE prefect;
