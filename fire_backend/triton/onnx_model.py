"""An ONNX model (a half, the whole model, or FIRE fused) served with onnxruntime: the CPU profile.

Tensors are found by name: the ONNX file's input and output names, which the config must declare.
All requests of one ``execute`` call are concatenated, run once, and split back. The model that
receives client pixels validates them first when ``INPUT_RANGE`` is set in the config.
"""

from __future__ import annotations

import numpy as np

from fire_backend.names import (
    PARAM_CHECK_FINITE,
    PARAM_ONNX_FILE,
    PARAM_THREADS,
    PARAM_TRAFFIC_STATS,
    WHOLE_ONNX,
)
from fire_backend.onnx_runtime import onnx_session
from fire_backend.triton.common import answer_batched, input_range, parse_args, require_io
from fire_backend.validation import finite_problem, pixel_problem


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config, params, version_dir = parse_args(args)
        self.session = onnx_session(
            version_dir / params.get(PARAM_ONNX_FILE, WHOLE_ONNX), threads=int(params.get(PARAM_THREADS, "1"))
        )
        (self.input_name,) = [i.name for i in self.session.get_inputs()]
        (self.output_name,) = [o.name for o in self.session.get_outputs()]
        require_io(config, [self.input_name], [self.output_name])
        self.input_range = input_range(params)
        self.check_finite = params.get(PARAM_CHECK_FINITE) == "1"
        if params.get(PARAM_TRAFFIC_STATS) == "1":  # the protected model's tail: record what it serves
            from fire_backend.triton.traffic_recorder import recorder_for

            self.traffic = recorder_for(args, config, params, self.input_name, self.output_name)
        else:
            self.traffic = None

    def _problem(self, x: np.ndarray) -> str | None:
        problem = pixel_problem(x, *self.input_range) if self.input_range else None
        if problem is None and self.check_finite:
            problem = finite_problem(x)
        return problem

    def _run(self, batch: np.ndarray, sources: list[str]) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: batch})[0]
        if self.traffic is not None:
            self.traffic.record(batch, out, sources)
        return out

    def execute(self, requests):
        return answer_batched(requests, self.input_name, self.output_name, self._problem, self._run)

    def finalize(self) -> None:
        if self.traffic is not None:
            self.traffic.close()
