"""The machinery that wires stages: params, CLI, atomic outputs, Zarr layouts, video I/O, tracking."""
