"""FIRE folded (CPU profile): head -> repair -> tail as one onnxruntime session in one Python-backend
model, zero extra hops, with hot-swappable directions.

The fused model folds the repair into one ONNX graph with its parameters as constants and so loses hot
swap; the ensemble keeps it but pays a Python-backend hop per step. The folded model's graph
(``modelio.fuse.build_folded_onnx``) takes the repair's parameters as inputs: every call feeds them from
the direction file being served (``formula.folded_inputs``, computed once per file), so a swap changes
what is fed, never the session. It watches the same direction file as the protected model's repair
model (``fire_backend.reloader``), bound to the same head, so ``fire reload`` swaps it too, under load,
with no failed request; the graph's second output, the first score per sample, feeds the metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fire_backend.files import sha256_file
from fire_backend.formula import NumpyRepair, RepairInputError, folded_inputs
from fire_backend.names import (
    DIRECTIONS_FILE,
    FOLDED_INPUTS,
    FOLDED_SCORE,
    MODEL_VERSION,
    PARAM_DIRECTIONS_OF,
    PARAM_ONNX_FILE,
    PARAM_PRODUCER_ONNX,
    PARAM_THREADS,
    WHOLE_ONNX,
)
from fire_backend.onnx_runtime import onnx_session
from fire_backend.triton.common import answer_batched, input_range, parse_args, require_io
from fire_backend.triton.served_directions import ServedDirections
from fire_backend.validation import pixel_problem


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config, params, version_dir = parse_args(args)
        repo_root = Path(args["model_repository"]).parent
        self.session = onnx_session(version_dir / params.get(PARAM_ONNX_FILE, WHOLE_ONNX),
                                    int(params.get(PARAM_THREADS, "1")))  # fmt: skip
        inputs = [i.name for i in self.session.get_inputs()]
        missing = [n for n in FOLDED_INPUTS if n not in inputs]
        if missing:  # a graph built before the readout was an input
            raise RepairInputError(f"{version_dir}: this folded graph takes no {', '.join(missing)}; rebuild the "
                                   "repository with `fire build-repo`")  # fmt: skip
        (self.input_name,) = [n for n in inputs if n not in FOLDED_INPUTS]
        (self.output_name,) = [o.name for o in self.session.get_outputs() if o.name != FOLDED_SCORE]
        require_io(config, [self.input_name], [self.output_name])
        self.input_range = input_range(params)
        head_onnx = repo_root / params[PARAM_PRODUCER_ONNX]
        feature_shape = tuple(onnx_session(head_onnx).get_outputs()[0].shape[1:])
        self.directions = ServedDirections(  # the repair model's file: one file, every watcher swaps
            args["model_name"],
            repo_root / params[PARAM_DIRECTIONS_OF] / MODEL_VERSION / DIRECTIONS_FILE,
            feature_shape,
            sha256_file(head_onnx),
            params,
            NumpyRepair,
        )
        rank_axis = next(i.shape[0] for i in self.session.get_inputs() if i.name == FOLDED_INPUTS[0])
        if isinstance(rank_axis, int):  # a graph built before the rank axis was dynamic takes 16 rows only
            raise RepairInputError(f"{version_dir}: this folded graph has a fixed rank ({rank_axis}); rebuild the "
                                   "repository with `fire build-repo`")  # fmt: skip
        self._fed: tuple[object, dict[str, np.ndarray]] = (None, {})
        self._feed(self.directions.repair)

    def _feed(self, repair: NumpyRepair) -> dict[str, np.ndarray]:
        """The graph's parameter inputs for ``repair`` (computed once per direction file)."""
        current, feed = self._fed
        if current is not repair:
            feed = folded_inputs(repair.params)
            self._fed = (repair, feed)
        return feed

    def _problem(self, x: np.ndarray) -> str | None:
        return pixel_problem(x, *self.input_range) if self.input_range else None

    def _run(self, batch: np.ndarray, sources: list[str]) -> np.ndarray:
        repair = self.directions.repair  # one file per batch, even while a new one is swapped in
        feed = self._feed(repair)
        logits, scores = self.session.run([self.output_name, FOLDED_SCORE], {self.input_name: batch, **feed})
        if not np.isfinite(scores).all():
            raise RepairInputError("features contain NaN or Inf")
        self.directions.record(scores, repair)
        return logits

    def execute(self, requests):
        return answer_batched(requests, self.input_name, self.output_name, self._problem, self._run)

    def finalize(self) -> None:
        self.directions.close()
