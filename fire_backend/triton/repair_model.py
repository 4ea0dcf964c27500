"""FIRE's repair step: features in, repaired features out, edited in place (no copy of ours).

At initialize it loads the direction file and validates it against the deployment (feature shape
from this model's config, sha256 of the deployed head ONNX, and on a GPU the engine built from it);
any problem raises, so the model and every ensemble using it stay unavailable (fail closed). It then
watches the file and swaps in a replaced one that validates (``fire_backend.reloader``).

Two forms of the one formula (``fire_backend.formula``):
- CPU instance: ``NumpyRepair`` on a NumPy view of the request's tensor; the stub imports no torch.
- GPU instance (FORCE_CPU_ONLY_INPUT_TENSORS=no): torch ``Repair`` on the CUDA tensor, taken and handed
  back through DLPack as tensor objects, so that the backend synchronises streams.
"""

from __future__ import annotations

from pathlib import Path

import triton_python_backend_utils as pb_utils

from fire_backend.engines import check_binding
from fire_backend.files import sha256_file
from fire_backend.formula import NumpyRepair, RepairInputError
from fire_backend.names import (
    DIRECTIONS_FILE,
    FEATURES,
    PARAM_DIRECTIONS,
    PARAM_PRODUCER_ONNX,
    PARAM_THREADS,
    REPAIRED,
)
from fire_backend.triton.common import error_response, parse_args, require_io
from fire_backend.triton.served_directions import ServedDirections


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config, params, version_dir = parse_args(args)
        self.gpu = args.get("model_instance_kind", "").upper().endswith("GPU")  # KIND_GPU -> "GPU"
        require_io(config, [FEATURES], [REPAIRED])
        feature_shape = tuple(int(d) for d in pb_utils.get_input_config_by_name(config, FEATURES)["dims"])
        repo_root = Path(args["model_repository"]).parent
        head_onnx = repo_root / params[PARAM_PRODUCER_ONNX]
        if not head_onnx.is_file():
            raise FileNotFoundError(f"FIRE: deployed head {head_onnx} not found; refusing to serve unverified")
        producer_sha256 = sha256_file(head_onnx)
        make_repair = NumpyRepair
        if self.gpu:
            import torch

            from fire_backend.repair import Repair

            torch.set_num_threads(int(params.get(PARAM_THREADS, "1")))
            self.torch, self.device = torch, torch.device(f"cuda:{args['model_instance_device_id']}")
            major, minor = torch.cuda.get_device_capability(self.device)
            check_binding(head_onnx.parent, f"{major}.{minor}", producer_sha256)  # the plan served is that ONNX's

            def make_repair(d, mode):
                return Repair(d, mode=mode, device=self.device)

        # Fail closed: a missing or invalid file raises here, and neither this model nor its ensemble loads.
        path = version_dir / params.get(PARAM_DIRECTIONS, DIRECTIONS_FILE)
        name = args["model_name"]
        self.directions = ServedDirections(name, path, feature_shape, producer_sha256, params, make_repair)

    def _features(self, tensor):
        """The request's features without a copy: a NumPy view (CPU) or a CUDA tensor (DLPack)."""
        if not self.gpu:
            return tensor.as_numpy()
        x = self.torch.from_dlpack(tensor)  # the protocol object, so stream handling is the backend's
        return x if x.device == self.device else x.to(self.device)

    def _output(self, y):
        """Hand the repaired memory back: a CUDA tensor as the DLPack object; a NumPy array as it is (the
        backend copies it into the response's shared memory, the protocol's copy)."""
        if self.gpu:
            return pb_utils.Tensor.from_dlpack(REPAIRED, y)
        return pb_utils.Tensor(REPAIRED, y)

    def execute(self, requests):
        responses = []
        for request in requests:  # one by one: each input is repaired in place, nothing concatenated
            x = self._features(pb_utils.get_input_tensor_by_name(request, FEATURES))
            repair = self.directions.repair  # one file per request, even while a new one is swapped in
            try:
                y, scores = repair.repair_with_scores(x, inplace=True)
            except RepairInputError as e:
                self.directions.record_rejected()
                responses.append(error_response(f"FIRE repair: {e}"))
                continue
            self.directions.record(scores, repair)
            responses.append(pb_utils.InferenceResponse([self._output(y)]))
        return responses

    def finalize(self) -> None:
        self.directions.close()
