"""evomerge's merge engine: config → plan → streamed tensor kernels → sink (folder or live model)."""

__version__ = "0.1.0"
