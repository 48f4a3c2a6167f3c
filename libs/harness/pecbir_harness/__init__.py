"""pecbir_harness: running the services as processes or in one process, for tests, demos,
soaks and benchmarks. Not part of any service image.

- `services`  the table of services (app factory or Celery app, port, env prefix, queues,
              probe paths) that `pecbir serve`, `Cluster` and `EmbeddedSystem` start from
- `procs`     free ports, child processes, private Redis, S3 buckets, uvicorn apps, Celery
              workers, and `Cluster` (the whole cloud side on loopback)
- `radosgw`   a single-node Ceph radosgw (real S3) on loopback; `deploy/local/radosgw`
- `embedded`  `EmbeddedSystem`: every service in one process (the demo's mode); `served`
- `workload`  sealing images for upload, percentiles
- `dicom`     synthetic MR images, SEG masks, STOW-RS bodies, real encoders per transfer syntax
- `orthanc`   a real PACS on loopback (Debian's Orthanc + DICOMweb plugin) wired to the encryptor
- `soak`      the bounded soak run behind `pecbir soak`
"""
