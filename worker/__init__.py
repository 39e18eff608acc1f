"""Celery workers that run qdpo_core pipelines for the jobs the API stores."""
