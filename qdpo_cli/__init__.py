"""The `qdpo` command: local runs, the server commands (serve, api, worker, migrate, keys), the demo.

This package sits on top of everything (qdpo_core, the service, the API, the worker and the client
commands); `qdpo_client`, the SDK users install, imports none of it.
"""
