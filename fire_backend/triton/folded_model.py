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

from fire_backend.files import sha256_file
from fire_backend.formula import NumpyRepair
from fire_backend.names import (
    DIRECTIONS_FILE,
    FEATURES,
    MODEL_VERSION,
    PARAM_DIRECTIONS_OF,
    PARAM_PRODUCER_ONNX,
    PARAM_TAIL_ONNX,
    PARAM_THREADS,
)
from fire_backend.onnx_runtime import onnx_session
from fire_backend.triton.common import answer_batched, input_range, parse_args, require_io
from fire_backend.triton.served_directions import ServedDirections
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
        self.input_range = input_range(params)
        feature_shape = tuple(self.head.get_outputs()[0].shape[1:])
        self.directions = ServedDirections(  # the repair model's file: one file, every watcher swaps
            args["model_name"],
            repo_root / params[PARAM_DIRECTIONS_OF] / MODEL_VERSION / DIRECTIONS_FILE,
            feature_shape,
            sha256_file(head_onnx),
            params,
            NumpyRepair,
        )

    def _problem(self, x: np.ndarray) -> str | None:
        return pixel_problem(x, *self.input_range) if self.input_range else None

    def _run(self, batch: np.ndarray, sources: list[str]) -> np.ndarray:
        repair = self.directions.repair
        features = self.head.run([FEATURES], {self.input_name: batch})[0]
        features, scores = repair.repair_with_scores(features, inplace=True)  # onnxruntime's own output
        logits = self.tail.run([self.output_name], {FEATURES: features})[0]
        self.directions.record(scores, repair)
        return logits

    def execute(self, requests):
        return answer_batched(requests, self.input_name, self.output_name, self._problem, self._run)

    def finalize(self) -> None:
        self.directions.close()
