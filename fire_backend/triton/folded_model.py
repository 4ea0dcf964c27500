"""FIRE folded (CPU profile): head -> repair -> tail in one Python-backend model, zero extra hops, with
hot-swappable directions.

The fused model folds the repair into one ONNX graph and so loses hot swap; the ensemble keeps it but
pays a Python-backend hop per step. This model runs the two ONNX halves with onnxruntime in one stub and
repairs the head's output in place between them (``NumpyRepair``, on the array onnxruntime just
returned: no copy of ours). It watches the same direction file as the protected model's repair model
(``fire_backend.reloader``), so ``fire reload`` swaps it too, under load, with no failed request.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from fire_backend.files import sha256_file
from fire_backend.formula import NumpyRepair, RepairInputError
from fire_backend.names import (
    FEATURES,
    PARAM_DIRECTIONS,
    PARAM_DIRECTIONS_POLL,
    PARAM_INPUT_RANGE,
    PARAM_METRICS,
    PARAM_METRICS_INTERVAL,
    PARAM_MODE,
    PARAM_PRODUCER_ONNX,
    PARAM_TAIL_ONNX,
    PARAM_THREADS,
)
from fire_backend.onnx_runtime import onnx_session
from fire_backend.reloader import DirectionWatcher
from fire_backend.triton.common import error_response, parse_args, require_io
from fire_backend.triton.metrics import RepairMetrics
from fire_backend.validation import pixel_problem


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config, params, _ = parse_args(args)
        repo_root = Path(args["model_repository"]).parent
        threads = int(params.get(PARAM_THREADS, "1"))
        head_onnx = repo_root / params[PARAM_PRODUCER_ONNX]
        self.head = onnx_session(head_onnx, threads)
        self.tail = onnx_session(repo_root / params[PARAM_TAIL_ONNX], threads)
        (self.input_name,) = [i.name for i in self.head.get_inputs()]
        (self.output_name,) = [o.name for o in self.tail.get_outputs()]
        require_io(config, [self.input_name], [self.output_name])
        rng = params.get(PARAM_INPUT_RANGE)
        self.input_range = tuple(float(v) for v in rng.split(",")) if rng else None
        self.name = args["model_name"]
        feature_shape = tuple(self.head.get_outputs()[0].shape[1:])
        self.watcher = DirectionWatcher(
            repo_root / params[PARAM_DIRECTIONS],  # the repair model's file: one file, every watcher swaps
            feature_shape,
            sha256_file(head_onnx),
            mode=params.get(PARAM_MODE) or None,
            make_repair=NumpyRepair,
            on_change=self._changed,
            on_error=self._refused,
        )
        self.metrics = None
        if params.get(PARAM_METRICS, "on") != "off":
            interval = float(params.get(PARAM_METRICS_INTERVAL, "1.0"))
            self.metrics = RepairMetrics(self.name, self.watcher.current.directions, interval)
        self.watcher.start(float(params.get(PARAM_DIRECTIONS_POLL, "1.0")))

    def _changed(self, loaded) -> None:
        if self.metrics:
            self.metrics.use(loaded.directions)

    def _refused(self, error: Exception) -> None:
        pb_utils.Logger.log_error(f"{self.name}: kept the previous directions, refused the new file: {error}")
        if self.metrics:
            self.metrics.record_reload_failure()

    def execute(self, requests):
        responses = [None] * len(requests)
        arrays, owners = [], []
        for i, request in enumerate(requests):
            x = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            problem = pixel_problem(x, *self.input_range) if self.input_range else None
            if problem:
                responses[i] = error_response(problem)
            else:
                arrays.append(x)
                owners.append(i)
        if not arrays:
            return responses
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        repair = self.watcher.current.repair
        try:
            features = self.head.run([FEATURES], {self.input_name: batch})[0]
            features, scores = repair.repair_with_scores(features, inplace=True)  # onnxruntime's own output
            logits = self.tail.run([self.output_name], {FEATURES: features})[0]
        except RepairInputError as e:
            for i in owners:
                responses[i] = error_response(f"FIRE repair: {e}")
            return responses
        except Exception as e:  # an onnxruntime failure fails these requests, not the server
            for i in owners:
                responses[i] = error_response(f"inference failed: {e}", pb_utils.TritonError.INTERNAL)
            return responses
        if self.metrics:
            self.metrics.record(scores, repair)
        start = 0
        for i, x in zip(owners, arrays, strict=True):
            part = logits[start : start + len(x)]
            responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, part)])
            start += len(x)
        return responses

    def finalize(self) -> None:
        self.watcher.stop()
        if self.metrics:
            self.metrics.close()
