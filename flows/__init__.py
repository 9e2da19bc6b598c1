"""Prefect flows and tasks over nucleiflow.pipeline, and the `nucleiflow` CLI."""
