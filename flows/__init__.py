"""Prefect flows: tasks that wrap `pipelines` functions and DVC stages; no ML logic here."""
