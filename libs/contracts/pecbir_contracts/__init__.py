"""pecbir_contracts: what the services agree on, each thing defined in exactly one place.

- `layout`   bucket and object-key scheme of the object store
- `store`    the object-store interface (filesystem default, S3/MinIO through `minio`)
- `tasks`    Celery task names, queue names, event-stream names
- `schemas`  HTTP API models shared by gateway, search and encryptor
- `auth`     bearer tokens (JWT HS256) with a tenant claim
- `png`      the wire format of cipher images and masks, with its validation
- `events`   the vector/model event stream the search service follows
"""
