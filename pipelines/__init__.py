"""sqlops: the Text2SQL LLMOps library (data, model, evaluation, release, serving, monitoring).

Pure code with no orchestrator imports; `flows/` wraps it in Prefect tasks and `dvc.yaml` runs
its stage modules (`python -m pipelines.<...>`).
"""
