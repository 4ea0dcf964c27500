"""onnxruntime sessions with a fixed thread budget (several run side by side on few cores).

Used by the served halves (CPU profile) and by every tool that runs an exported ONNX file."""

from __future__ import annotations

from pathlib import Path


def onnx_session(path: str | Path, threads: int = 1):
    """A CPU session on ``path``: ``threads`` intra-op threads, sequential execution."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
