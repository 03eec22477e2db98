"""Video data: decoding and writing video files, manifests, synthetic videos, and the datasets that read the
clips and targets stores. Imports `pipeline.core` and `models`."""
