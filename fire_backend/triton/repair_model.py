"""FIRE's repair step: features in, repaired features out, edited in place (no copy of ours).

At initialize it loads the direction file and validates it against the deployment (feature shape
from this model's config, sha256 of the deployed head ONNX, and on a GPU the engine built from it);
any problem raises, so the model and every ensemble using it stay unavailable (fail closed). It then
watches the file and swaps in a replaced one that validates (``fire_backend.reloader``).

Two forms of the one formula (``fire_backend.formula``), chosen by what computes the features
(parameter ``HALVES``):
- onnxruntime (the CPU profile): ``NumpyRepair`` on a NumPy view of the request's tensor; the stub
  imports no torch.
- tensorrt or torch (the GPU profiles, FORCE_CPU_ONLY_INPUT_TENSORS=no): torch ``Repair`` on the
  instance's device, the tensor taken and handed back through DLPack as tensor objects, so that the
  backend synchronises streams. The head's engine (tensorrt) or TorchScript file (torch) must be bound
  to the ONNX file the direction file is bound to.
The first request is logged with where its features were and whether they were edited in place.
"""

from __future__ import annotations

from pathlib import Path

import triton_python_backend_utils as pb_utils

from fire_backend.engines import check_binding, check_torch_binding
from fire_backend.files import sha256_file
from fire_backend.formula import NumpyRepair, RepairInputError
from fire_backend.names import (
    DIRECTIONS_FILE,
    FEATURES,
    HALVES_ONNXRUNTIME,
    HALVES_RUNTIMES,
    HALVES_TENSORRT,
    PARAM_DIRECTIONS,
    PARAM_HALVES,
    PARAM_PRODUCER_ONNX,
    PARAM_THREADS,
    REPAIRED,
)
from fire_backend.triton.common import error_response, instance_device, parse_args, require_io
from fire_backend.triton.served_directions import ServedDirections


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config, params, version_dir = parse_args(args)
        require_io(config, [FEATURES], [REPAIRED])
        feature_shape = tuple(int(d) for d in pb_utils.get_input_config_by_name(config, FEATURES)["dims"])
        repo_root = Path(args["model_repository"]).parent
        head_onnx = repo_root / params[PARAM_PRODUCER_ONNX]
        if not head_onnx.is_file():
            raise FileNotFoundError(f"FIRE: deployed head {head_onnx} not found; refusing to serve unverified")
        producer_sha256 = sha256_file(head_onnx)
        halves = params.get(PARAM_HALVES, HALVES_ONNXRUNTIME)
        if halves not in HALVES_RUNTIMES:
            raise ValueError(f"FIRE: {PARAM_HALVES} must be one of {HALVES_RUNTIMES}, got {halves!r}")
        self.torch = None
        make_repair = NumpyRepair
        if halves != HALVES_ONNXRUNTIME:
            import torch

            from fire_backend.repair import Repair

            torch.set_num_threads(int(params.get(PARAM_THREADS, "1")))
            self.torch, self.device = torch, instance_device(torch, args)
            if halves == HALVES_TENSORRT:  # the plan served is that ONNX's
                major, minor = torch.cuda.get_device_capability(self.device)
                check_binding(head_onnx.parent, f"{major}.{minor}", producer_sha256)
            else:  # the TorchScript head is that ONNX's export
                check_torch_binding(head_onnx.parent, producer_sha256)

            def make_repair(d, mode):
                return Repair(d, mode=mode, device=self.device)

        # Fail closed: a missing or invalid file raises here, and neither this model nor its ensemble loads.
        path = version_dir / params.get(PARAM_DIRECTIONS, DIRECTIONS_FILE)
        self.name, self.logged = args["model_name"], False
        self.directions = ServedDirections(self.name, path, feature_shape, producer_sha256, params, make_repair)

    def _features(self, tensor):
        """The request's features without a copy: a NumPy view (NumPy form) or a torch tensor on the
        instance's device (DLPack)."""
        if self.torch is None:
            return tensor.as_numpy()
        x = self.torch.from_dlpack(tensor)  # the protocol object, so stream handling is the backend's
        return x if x.device == self.device else x.to(self.device)

    def _output(self, y):
        """Hand the repaired memory back: a torch tensor as the DLPack object; a NumPy array as it is (the
        backend copies it into the response's shared memory, the protocol's copy)."""
        if self.torch is not None:
            return pb_utils.Tensor.from_dlpack(REPAIRED, y)
        return pb_utils.Tensor(REPAIRED, y)

    def _log_first(self, tensor, x, y) -> None:
        """Once: where the features arrived and whether the repair edited them in place (the GPU check
        reads this line from the server's log)."""
        self.logged = True
        where = "host" if tensor.is_cpu() else "GPU"
        if self.torch is None:
            device, same = "cpu", y is x or y.__array_interface__["data"][0] == x.__array_interface__["data"][0]
        else:
            device, same = str(x.device), y.data_ptr() == x.data_ptr()
        pb_utils.Logger.log_info(f"FIRE repair {self.name}: first request's features in {where} memory "
                                 f"(is_cpu={tensor.is_cpu()}), repaired on {device}, in place: {same}")  # fmt: skip

    def execute(self, requests):
        responses = []
        for request in requests:  # one by one: each input is repaired in place, nothing concatenated
            tensor = pb_utils.get_input_tensor_by_name(request, FEATURES)
            x = self._features(tensor)
            repair = self.directions.repair  # one file per request, even while a new one is swapped in
            try:
                y, scores = repair.repair_with_scores(x, inplace=True)
            except RepairInputError as e:
                self.directions.record_rejected()
                responses.append(error_response(f"FIRE repair: {e}"))
                continue
            if not self.logged:
                self._log_first(tensor, x, y)
            self.directions.record(scores, repair)
            responses.append(pb_utils.InferenceResponse([self._output(y)]))
        return responses

    def finalize(self) -> None:
        self.directions.close()
