"""One module per pipeline stage: its Params, its run(), and its helpers."""
