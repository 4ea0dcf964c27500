"""Every name FIRE gives to something on disk or on the server, in one place.

A protected model ``<name>`` is served as an ensemble built from models named after it
(``ModelNames``); the tensors passed between them have fixed names; the direction file and the admin
header have one spelling each. Nothing else in the project spells these strings out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Tensors between the halves (the ensemble's own input/output keep the served model's names).
INPUT = "INPUT"  # pixels, for models FIRE exported itself
LOGITS = "LOGITS"
FEATURES = "FEATURES"  # the activation at the (first) repair layer
FEATURES2 = "FEATURES2"  # multi-layer: the activation at the second repair layer
REPAIRED = "REPAIRED"  # the repair model's output
GUARDED = "GUARDED"  # the GPU profile's input check: the pixels it let through
# the folded model's graph: the repair's parameters as inputs (formula.RepairParams.ARRAYS, in order), and s_1
FOLDED_INPUTS = ("FIRE_DIRECTIONS", "FIRE_OFFSETS", "FIRE_WEIGHTS", "FIRE_SHIFTS", "FIRE_THRESHOLD", "FIRE_READOUT")
FOLDED_PER_DIRECTION = tuple(n for n in FOLDED_INPUTS if n != "FIRE_THRESHOLD")  # a row per direction (rank axis)
FOLDED_SCORE = "FIRE_SCORE"

# Files
DIRECTIONS_FILE = "directions.safetensors"
HEAD_ONNX, MID_ONNX, TAIL_ONNX, WHOLE_ONNX = "head.onnx", "mid.onnx", "tail.onnx", "model.onnx"
TORCHSCRIPT = {HEAD_ONNX: "head.pt", MID_ONNX: "mid.pt", TAIL_ONNX: "tail.pt", WHOLE_ONNX: "model.pt"}  # the same
# parts as TorchScript (exports from torch only): what the gpu_torch profile's halves run
TORCH_FILE = TORCHSCRIPT[WHOLE_ONNX]  # in a model's version directory, beside its ONNX file
TORCH_STUB_FILE = "model_torch.py"  # the gpu_torch config's Python file (default_model_filename), beside model.py
SPLIT_JSON = "split.json"
FUSED_SOURCES = "fused_sources"  # in a fused model's directory: its export and direction file, to build a new version
TRITON_ONNX_FILE = WHOLE_ONNX  # Triton's default_model_filename for an onnxruntime model
LABELS_FILE = "labels.txt"  # class names, one per line: Triton's classification extension reads it
TRAFFIC_FILE = "traffic.safetensors"  # in the tail's model directory: what it served, per class (bounded)
MODEL_VERSION = "1"  # every generated model has this one version directory

# Keys (fire_backend.keys): the header (HTTP) / metadata key (gRPC) that carries each
ADMIN_HEADER = "fire-admin-key"  # model control, shared memory, statistics, logging, trace
INFERENCE_HEADER = "fire-inference-key"  # inference, model metadata, model config
GRPC_KEY_PREFIX = "triton-grpc-protocol-"  # Triton prefixes restricted gRPC keys
GRPC_ADMIN_HEADER = GRPC_KEY_PREFIX + ADMIN_HEADER
SOURCE_HEADER = "fire-source"  # set by the gateway (the client's address), forwarded to the models
GATEWAY_HEADER_PREFIX = "fire-"  # headers a client may not send through the gateway

# Environment
CACHE_ENV = "FIRE_CACHE_DIR"  # keys, logs, the server guard library, decoded datasets (private, 0700)
DATA_ENV = "FIRE_DATA_DIR"  # where the dataset archives are (default: ../shared/datasets)
ADMIN_KEY_ENV, ADMIN_KEY_FILE = "FIRE_ADMIN_KEY", "admin_key"  # the admin key: variable, else this file in the cache
INFERENCE_KEY_ENV, INFERENCE_KEY_FILE = "FIRE_INFERENCE_KEY", "inference_key"  # the inference key, likewise
TRACEBACK_ENV = "FIRE_TRACEBACK"  # set: an unexpected error (a bug) in `fire` prints its traceback
PARENT_ENV = "FIRE_PARENT_PID"  # tritonserver stops when the process that launched it goes
TRITONSERVER_ENV, BACKEND_DIR_ENV = "FIRE_TRITONSERVER", "FIRE_BACKEND_DIR"  # another server (the GPU profile's)

# Calibration: the spatial views an estimate covers (calibration.augment), by name
FLIPS_SHIFTS, FLIPS_SHIFTS_ZOOMS = "flips-shifts", "flips-shifts-zooms"
AUGMENTS = ("none", FLIPS_SHIFTS, FLIPS_SHIFTS_ZOOMS)
DEFAULT_AUGMENT = FLIPS_SHIFTS_ZOOMS

# Where things are
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the checkout (bundled models, results/, build/)
REPOSITORY_DIR = "model_repository"  # the default FIRE model repository, relative to the working directory
LOOPBACK = "127.0.0.1"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002  # tritonserver's (Triton's own defaults)
GATEWAY_HTTP_PORT, GATEWAY_GRPC_PORT, GATEWAY_METRICS_PORT = 9000, 9001, 9002  # the gateway's


def address(port: int, host: str = LOOPBACK) -> str:
    return f"{host}:{port}"


# Parameters of the Python-backend models (config.pbtxt ``parameters``)
PARAM_ONNX_FILE = "ONNX_FILE"
PARAM_THREADS = "THREADS"
PARAM_INPUT_RANGE = "INPUT_RANGE"
PARAM_GUARD_INPUT = "GUARD_INPUT"  # the input check's input tensor (the served model's own input name)
PARAM_TRAFFIC_STATS = "TRAFFIC_STATS"  # "1": the tail records bounded statistics of the traffic it serves
PARAM_TRAFFIC_BUDGET = "TRAFFIC_BUDGET_BYTES"
PARAM_CHECK_FINITE = "CHECK_FINITE"  # the model takes features (tail, mid): refuse NaN / Inf as the repair does
PARAM_DIRECTIONS = "DIRECTIONS"  # the repair model: its direction file, relative to its version directory
PARAM_DIRECTIONS_OF = "DIRECTIONS_OF"  # the folded model: the repair model whose direction file it serves
PARAM_DIRECTIONS_POLL = "DIRECTIONS_POLL_S"  # how often the repair model looks for a replaced direction file
PARAM_PRODUCER_ONNX = "HEAD_ONNX"  # the ONNX file whose output the repair edits (the direction file is bound to it)
PARAM_MODE = "MODE"
PARAM_METRICS = "METRICS"  # METRICS_LEVELS: off, on (counts and the direction in use), detailed (+ per-sample scores)
METRICS_OFF, METRICS_ON, METRICS_DETAILED = METRICS_LEVELS = ("off", "on", "detailed")
PARAM_METRICS_INTERVAL = "METRICS_INTERVAL_S"
PARAM_PREPROCESS = "FIRE_PREPROCESS"  # JSON: how clients turn images into the protected model's input

# Serving profiles: config.pbtxt (cpu) or configs/<profile>.pbtxt. gpu: TensorRT halves; gpu_torch: the halves
# as TorchScript run by torch on CUDA in the Python backend (no TensorRT needed)
PROFILES = CPU_PROFILE, GPU_PROFILE, GPU_TORCH_PROFILE = ("cpu", "gpu", "gpu_torch")
PARAM_HALVES = "HALVES"  # the repair model: what runs the head whose output it edits (HALVES_RUNTIMES)
HALVES_RUNTIMES = HALVES_ONNXRUNTIME, HALVES_TENSORRT, HALVES_TORCH = ("onnxruntime", "tensorrt", "torch")

# The models a protected model ``<name>`` is built from: attribute -> suffix
SUFFIXES = {
    "head": "_head",  # pixels -> features at the first cut
    "repair": "_fire",  # the repair at the first cut
    "mid": "_mid",  # multi-layer: features -> features at the second cut
    "repair2": "_fire2",  # multi-layer: the repair at the second cut
    "tail": "_tail",  # features -> logits
    "plain": "_plain",  # ensemble head -> tail, unprotected (benchmarks and comparisons)
    "fused": "_fused",  # head -> repair -> tail folded into one ONNX model
    "folded": "_folded",  # CPU: head, repair, tail in one Python model (zero hops, hot-swappable directions)
    "whole": "_whole",  # the unsplit model, unprotected (the serving baseline)
    "unprotected": "_unprotected",  # a protected repository entry's original model, kept as it was
    "guard": "_guard",  # the GPU profile's input check, first step of every model that takes pixels
}


@dataclass(frozen=True)
class ModelNames:
    """The models that serve protected model ``name``: ``ModelNames("cifar10").head == "cifar10_head"``."""

    name: str
    head: str = field(init=False)
    repair: str = field(init=False)
    mid: str = field(init=False)
    repair2: str = field(init=False)
    tail: str = field(init=False)
    plain: str = field(init=False)
    fused: str = field(init=False)
    folded: str = field(init=False)
    whole: str = field(init=False)
    unprotected: str = field(init=False)
    guard: str = field(init=False)

    def __post_init__(self) -> None:
        for attr, suffix in SUFFIXES.items():
            object.__setattr__(self, attr, self.name + suffix)

    @property
    def protected(self) -> str:
        return self.name

    def variant(self, suffix: str) -> str:
        """Another protected ensemble on the same halves (another mode or direction file)."""
        return f"{self.name}_{suffix}"

    def variant_repair(self, suffix: str) -> str:
        return f"{self.repair}_{suffix}"
