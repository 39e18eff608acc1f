"""Routers, one module per resource, all under /v1.

The application includes each of them itself with the /v1 prefix (api.main) rather than through
one /v1 router: FastAPI matches a request against every level of nested routers, and again at
each level as it descends, so one level less is less work on every request.
"""

from api.routes import files, job_outputs, jobs, models, webhooks

API_PREFIX = "/v1"
resource_routers = (models.router, files.router, jobs.router, job_outputs.router, webhooks.router)
