"""pecbir_contracts: what the services agree on, each thing defined in exactly one place.

- `layout`   bucket and object-key scheme of the object store (keys made and parsed back)
- `routes`   every HTTP path template of the gateway, search and encryptor APIs
- `store`    the object-store interface and its errors (back ends: `pecbir_platform.store`)
- `tasks`    Celery task names, queue names, event-stream names
- `schemas`  HTTP API models shared by gateway, search and encryptor
- `auth`     bearer tokens (JWT HS256) with a tenant claim
- `png`      the wire format of cipher images and masks, with its validation
- `events`   the vector/model events the search service follows, and the bus interface
"""
