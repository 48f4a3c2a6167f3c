"""The encryptor's HTTP API, one router per resource (registered in this order by `app`)."""
