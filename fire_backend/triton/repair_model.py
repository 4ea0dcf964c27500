"""FIRE's repair step: features in, repaired features out, edited in place (DLPack in, no copy of ours).

At initialize it loads the direction file and validates it against the deployment (feature shape
from this model's config, sha256 of the deployed head ONNX); any problem raises, so the model and
every ensemble using it stay unavailable (fail closed). It places itself on the instance's device;
with FORCE_CPU_ONLY_INPUT_TENSORS=no (GPU profile) inputs arrive as CUDA tensors and stay there.
"""

from __future__ import annotations

from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from fire_backend.engines import check_binding
from fire_backend.files import sha256_file
from fire_backend.names import (
    DIRECTIONS_FILE,
    FEATURES,
    PARAM_DIRECTIONS,
    PARAM_DIRECTIONS_POLL,
    PARAM_METRICS,
    PARAM_METRICS_INTERVAL,
    PARAM_MODE,
    PARAM_PRODUCER_ONNX,
    PARAM_THREADS,
    REPAIRED,
)
from fire_backend.reloader import DirectionWatcher
from fire_backend.repair import RepairInputError
from fire_backend.triton.common import error_response, parse_args, require_io
from fire_backend.triton.metrics import RepairMetrics


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config, params, version_dir = parse_args(args)
        torch.set_num_threads(int(params.get(PARAM_THREADS, "1")))
        if args.get("model_instance_kind", "").upper().endswith("GPU"):  # KIND_GPU -> "GPU"
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
        else:
            self.device = torch.device("cpu")
        require_io(config, [FEATURES], [REPAIRED])
        feature_shape = tuple(int(d) for d in pb_utils.get_input_config_by_name(config, FEATURES)["dims"])
        repo_root = Path(args["model_repository"]).parent
        head_onnx = repo_root / params[PARAM_PRODUCER_ONNX]
        if not head_onnx.is_file():
            raise FileNotFoundError(f"FIRE: deployed head {head_onnx} not found; refusing to serve unverified")
        producer_sha256 = sha256_file(head_onnx)
        if self.device.type == "cuda":  # the head served here is a TensorRT plan: it must come from that ONNX
            major, minor = torch.cuda.get_device_capability(self.device)
            check_binding(head_onnx.parent, f"{major}.{minor}", producer_sha256)
        self.name = args["model_name"]
        self.metrics = None
        # Fail closed: a missing or invalid file raises here, and neither this model nor its ensemble loads.
        self.watcher = DirectionWatcher(
            version_dir / params.get(PARAM_DIRECTIONS, DIRECTIONS_FILE),
            feature_shape,
            producer_sha256,
            mode=params.get(PARAM_MODE) or None,
            device=str(self.device),
            on_change=self._changed,
            on_error=self._refused,
        )
        if params.get(PARAM_METRICS, "on") != "off":
            interval = float(params.get(PARAM_METRICS_INTERVAL, "1.0"))
            self.metrics = RepairMetrics(self.name, self.watcher.current.directions, interval)
        poll = float(params.get(PARAM_DIRECTIONS_POLL, "1.0"))
        if poll > 0:
            self.watcher.start(poll)

    def _changed(self, loaded) -> None:
        pb_utils.Logger.log_info(f"{self.name}: now serving direction file {loaded.directions.created} "
                                 f"(version {loaded.directions.version})")  # fmt: skip
        if self.metrics:
            self.metrics.use(loaded.directions)

    def _refused(self, error: Exception) -> None:
        pb_utils.Logger.log_error(f"{self.name}: kept the previous directions, refused the new file: {error}")
        if self.metrics:
            self.metrics.record_reload_failure()

    def _output(self, y: torch.Tensor):
        """Hand the repaired memory back without a copy of ours.

        CUDA tensors go through DLPack, as the tensor object (``__dlpack__``) rather than a capsule, so
        that the backend synchronises its stream with torch's. A CPU tensor goes back as a NumPy view of
        the same memory; the backend copies it into the response's shared memory either way."""
        if y.is_cuda:
            return pb_utils.Tensor.from_dlpack(REPAIRED, y)
        return pb_utils.Tensor(REPAIRED, y.numpy())

    def execute(self, requests):
        responses = []
        for request in requests:  # one by one: each input is repaired in place, nothing concatenated
            tensor = pb_utils.get_input_tensor_by_name(request, FEATURES)
            x = torch.from_dlpack(tensor)  # no copy: the protocol object, so stream handling is the backend's
            if x.device != self.device:
                x = x.to(self.device)
            repair = self.watcher.current.repair  # one file per request, even while a new one is swapped in
            try:
                y, scores = repair.repair_with_scores(x, inplace=True)
            except RepairInputError as e:
                if self.metrics:
                    self.metrics.record_rejected()
                responses.append(error_response(f"FIRE repair: {e}"))
                continue
            if self.metrics:
                self.metrics.record(scores, repair)
            responses.append(pb_utils.InferenceResponse([self._output(y)]))
        return responses

    def finalize(self) -> None:
        self.watcher.stop()
        if self.metrics:
            self.metrics.close()
