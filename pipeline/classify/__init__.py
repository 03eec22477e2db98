"""Action classification: the clip datasets of fine-tuning, mixup/cutmix and evaluation.
Imports `pipeline.core`, `pipeline.data` and `models`."""
