"""pecbir_platform: the back ends behind the contracts, shared by every cloud service.

- `store`          object-store back ends (filesystem default, S3/MinIO through `minio`)
- `bus`            event-bus back ends (Redis stream, in-process list)
- `observability`  JSON logs with request ids, Prometheus metrics, health/readiness checks
- `config`         settings from the environment: one line naming a bad variable
- `web`            what every HTTP service shares: bearer claims, capped uploads, store errors
"""
