-- Run once by the postgres image on an empty data volume: one database per service, all owned by
-- POSTGRES_USER (the image's superuser). Give each service its own role in a shared cluster.
CREATE DATABASE mlflow;      -- MLflow tracking + model registry (backend store)
CREATE DATABASE prefect;     -- Prefect server
CREATE DATABASE inference;   -- the gateway's inference log (serving.inference_log_url)
