"""An ONNX model (a half, the whole model, or FIRE fused) served with onnxruntime: the CPU profile.

Tensors are found by name: the ONNX file's input and output names, which the config must declare.
All requests of one ``execute`` call are concatenated, run once, and split back. The model that
receives client pixels validates them first when ``INPUT_RANGE`` is set in the config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from fire_backend.names import (
    PARAM_CHECK_FINITE,
    PARAM_INPUT_RANGE,
    PARAM_ONNX_FILE,
    PARAM_THREADS,
    PARAM_TRAFFIC_BUDGET,
    PARAM_TRAFFIC_STATS,
    TRAFFIC_FILE,
)
from fire_backend.onnx_runtime import onnx_session
from fire_backend.triton.common import error_response, parse_args, require_io
from fire_backend.validation import finite_problem, pixel_problem


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config, params, version_dir = parse_args(args)
        self.session = onnx_session(
            version_dir / params.get(PARAM_ONNX_FILE, "model.onnx"), threads=int(params.get(PARAM_THREADS, "1"))
        )
        (self.input_name,) = [i.name for i in self.session.get_inputs()]
        (self.output_name,) = [o.name for o in self.session.get_outputs()]
        require_io(config, [self.input_name], [self.output_name])
        rng = params.get(PARAM_INPUT_RANGE)
        self.input_range = tuple(float(v) for v in rng.split(",")) if rng else None
        self.check_finite = params.get(PARAM_CHECK_FINITE) == "1"
        self.traffic = None
        if params.get(PARAM_TRAFFIC_STATS) == "1":  # the protected model's tail: record what it serves
            from fire_backend.triton.traffic_recorder import TrafficRecorder

            features = int(np.prod(self.session.get_inputs()[0].shape[1:]))
            classes = int(np.prod(self.session.get_outputs()[0].shape[1:]))
            path = Path(args["model_repository"]) / TRAFFIC_FILE
            budget = int(params.get(PARAM_TRAFFIC_BUDGET, str(64 << 20)))
            self.traffic = TrafficRecorder(args["model_name"], path, classes, features, budget, 5.0)

    def execute(self, requests):
        responses = [None] * len(requests)
        arrays, owners = [], []
        for i, request in enumerate(requests):
            x = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            problem = pixel_problem(x, *self.input_range) if self.input_range else None
            if problem is None and self.check_finite:
                problem = finite_problem(x)
            if problem:
                responses[i] = error_response(problem)
            else:
                arrays.append(x)
                owners.append(i)
        if arrays:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            try:
                out = self.session.run([self.output_name], {self.input_name: batch})[0]
            except Exception as e:  # an ONNX runtime failure fails these requests, not the server
                for i in owners:
                    responses[i] = error_response(f"inference failed: {e}", pb_utils.TritonError.INTERNAL)
                return responses
            if self.traffic is not None:
                self.traffic.record(batch, out)
            start = 0
            for i, x in zip(owners, arrays, strict=True):
                part = out[start : start + len(x)]
                start += len(x)
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, part)])
        return responses

    def finalize(self) -> None:
        if self.traffic is not None:
            self.traffic.close()
