"""The GPU profile's input check. A TensorRT half cannot refuse bad pixels, so in the GPU profile every
model that takes client pixels starts with this step: the same pixels out (DLPack: no copy of ours, no
host round trip), or INVALID_ARG for NaN / Inf or values outside what real pixels give after the declared preprocessing,
the policy the CPU profile's head applies itself (``fire_backend.validation``). In the CPU profile the
model is loaded but unused; it imports torch only on a GPU instance.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from fire_backend.names import GUARDED, PARAM_GUARD_INPUT, PARAM_INPUT_RANGE
from fire_backend.triton.common import error_response, parse_args, require_io
from fire_backend.validation import range_problem


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config, params, _ = parse_args(args)
        self.input_name = params[PARAM_GUARD_INPUT]
        require_io(config, [self.input_name], [GUARDED])
        self.low, self.high = (float(v) for v in params[PARAM_INPUT_RANGE].split(","))
        self.gpu = args.get("model_instance_kind", "").upper().endswith("GPU")

    def _check(self, tensor) -> tuple[str | None, object]:
        if self.gpu:
            import torch

            x = torch.from_dlpack(tensor)
            if x.numel() == 0:
                return None, tensor
            stats = float(x.sum(dtype=torch.float64)), float(x.min()), float(x.max())
            return range_problem(*stats, self.low, self.high), pb_utils.Tensor.from_dlpack(GUARDED, x)
        x = tensor.as_numpy()
        if x.size == 0:
            return None, pb_utils.Tensor(GUARDED, x)
        stats = float(x.sum(dtype="float64")), float(x.min()), float(x.max())
        return range_problem(*stats, self.low, self.high), pb_utils.Tensor(GUARDED, x)

    def execute(self, requests):
        responses = []
        for request in requests:
            problem, out = self._check(pb_utils.get_input_tensor_by_name(request, self.input_name))
            responses.append(error_response(problem) if problem else pb_utils.InferenceResponse([out]))
        return responses
