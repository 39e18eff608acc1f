"""The service layer shared by the API and the workers: settings, database, broker, artifact store.

Nothing here imports FastAPI or torch. The API (`api/`) maps this layer's domain errors
(`service.errors`) to HTTP answers in one place; the workers (`worker/`) use the same data layer
without any web code.
"""
