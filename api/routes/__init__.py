"""Routers, one module per resource, gathered into `api_router` under /v1."""

from fastapi import APIRouter

from api.routes import files, job_outputs, jobs, models, webhooks

api_router = APIRouter(prefix="/v1")
api_router.include_router(models.router)
api_router.include_router(files.router)
api_router.include_router(jobs.router)
api_router.include_router(job_outputs.router)
api_router.include_router(webhooks.router)
