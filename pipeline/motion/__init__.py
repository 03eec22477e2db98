"""The motion branch's algorithms: cycle-consistency tests, the label store, motion metrics, augmentation,
synthetic training samples and pictures. Imports `pipeline.core`, `pipeline.data` and `models`."""
