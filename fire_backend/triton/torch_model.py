"""A half (or the whole model) as TorchScript, run by torch on the instance's device: the gpu_torch
profile, for a GPU with no TensorRT (or a model TensorRT cannot build).

Inputs come through DLPack (``FORCE_CPU_ONLY_INPUT_TENSORS=no``: a tensor another step left on the GPU
stays there; client pixels arrive in host memory and move once to the device). Each request is checked
on the device where the config asks (client pixels: the declared range; features: finite), the
accepted ones run as one batch, and each output goes back as a CUDA tensor through DLPack: no host
round trip between the steps. The file is verified at load against the ONNX it was exported with
(``fire_backend.engines.check_torch_binding``: the repair model checks the head's binding the same way).
On a CPU instance the same code runs torch on the CPU (how the suite tests it here).
"""

from __future__ import annotations

import warnings

import triton_python_backend_utils as pb_utils

from fire_backend.engines import check_torch_binding
from fire_backend.files import sha256_file
from fire_backend.names import (
    PARAM_CHECK_FINITE,
    PARAM_ONNX_FILE,
    PARAM_THREADS,
    PARAM_TRAFFIC_STATS,
    WHOLE_ONNX,
)
from fire_backend.triton.common import error_response, input_range, instance_device, parse_args, request_source
from fire_backend.validation import range_problem


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import torch

        config, params, version_dir = parse_args(args)
        torch.set_num_threads(int(params.get(PARAM_THREADS, "1")))
        self.torch, self.device = torch, instance_device(torch, args)
        if len(config["input"]) != 1 or len(config["output"]) != 1:
            raise ValueError(f"{args['model_name']}: a torch half has one input and one output")
        self.input_name, self.output_name = config["input"][0]["name"], config["output"][0]["name"]
        onnx_file = version_dir / params.get(PARAM_ONNX_FILE, WHOLE_ONNX)
        torch_file = check_torch_binding(version_dir, sha256_file(onnx_file))  # fail closed on a stale file
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice; TorchScript is the stable format
            self.module = torch.jit.load(str(torch_file), map_location=self.device).eval()
        self.input_range = input_range(params)
        self.check_finite = params.get(PARAM_CHECK_FINITE) == "1"
        if params.get(PARAM_TRAFFIC_STATS) == "1":  # observe mode: the tail records what it serves (host copy)
            from fire_backend.triton.traffic_recorder import recorder_for

            self.traffic = recorder_for(args, config, params, self.input_name, self.output_name)
        else:
            self.traffic = None

    def _problem(self, x) -> str | None:
        if x.numel() == 0 or not (self.input_range or self.check_finite):
            return None
        if self.input_range:  # the range check needs the float64 sum, min and max (three reductions)
            total, lo, hi = float(x.sum(dtype=self.torch.float64)), float(x.min()), float(x.max())
            return range_problem(total, lo, hi, *self.input_range)
        if not bool(self.torch.isfinite(x.sum(dtype=self.torch.float64))):
            return "features contain NaN or Inf; the model refuses them as the repair does"
        return None

    def execute(self, requests):
        torch = self.torch
        responses, accepted, owners = [None] * len(requests), [], []
        for i, request in enumerate(requests):
            x = torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, self.input_name))
            x = x if x.device == self.device else x.to(self.device)
            problem = self._problem(x)
            if problem:
                responses[i] = error_response(problem)
            else:
                accepted.append(x)
                owners.append(i)
        if not accepted:
            return responses
        try:
            with torch.inference_mode():
                batch = accepted[0] if len(accepted) == 1 else torch.cat(accepted)
                out = self.module(batch).contiguous()
            if self.traffic is not None:
                sources = [request_source(requests[i]) for i, x in zip(owners, accepted, strict=True) for _ in x]
                self.traffic.record(batch.float().cpu().numpy(), out.float().cpu().numpy(), sources)
        except Exception as e:  # noqa: BLE001 - a failed run fails these requests, not the server
            for i in owners:
                responses[i] = error_response(f"inference failed: {e}", pb_utils.TritonError.INTERNAL)
            return responses
        start = 0
        for i, x in zip(owners, accepted, strict=True):
            part = out[start : start + len(x)]
            responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack(self.output_name, part)])
            start += len(x)
        return responses

    def finalize(self) -> None:
        if self.traffic is not None:
            self.traffic.close()
