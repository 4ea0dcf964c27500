"""A small client for FIRE-protected models over gRPC or HTTP (tritonclient).

client = FireClient("127.0.0.1:8001", protocol="grpc")
logits = client.infer("cifar10", images)          # float32 (N, 3, 32, 32) in [0, 1]
labels = client.classify("cifar10", uint8_images) # (N, 32, 32, 3) uint8, e.g. from load_images()

Triton's raw ports answer inference only with the inference key (``fire_backend.keys``): the client
sends it when it is given, or, for a loopback address, when this user has one (``$FIRE_INFERENCE_KEY``
or the file ``fire serve`` wrote). Through the gateway no key is needed (the gateway adds its own);
a key is never sent to another machine unless given explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fire_backend.errors import InvalidInputError
from fire_backend.keys import INFERENCE
from fire_backend.network import host_of, is_loopback
from zoo.data import to_tensor_batch


@dataclass(frozen=True)
class ServedIO:
    """A served model's input (name, datatype, shape with -1 for variable dims) and output name."""

    input: str
    datatype: str
    shape: tuple[int, ...]
    output: str


def inference_headers(url: str, protocol: str, key: str | None = None) -> dict[str, str]:
    """The inference key's header for ``url``: ``key`` if given, else this user's key for a loopback
    address (none for any other address)."""
    key = key or (INFERENCE.find() if is_loopback(host_of(url)) else None)
    return INFERENCE.headers(key, protocol) if key else {}


class FireClient:
    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        max_batch_size: int = 64,
        timeout_s: float = 60.0,
        tls_root_cert: str | Path | None = None,
        key: str | None = None,
    ):
        if protocol == "grpc":
            import tritonclient.grpc as tc
        elif protocol == "http":
            import tritonclient.http as tc
        else:
            raise InvalidInputError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.tc, self.protocol, self.max_batch_size = tc, protocol, max_batch_size
        self.timeout_s = timeout_s
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        if tls_root_cert is not None:  # gRPC over TLS, trusting this (e.g. self-signed) certificate
            if protocol != "grpc":
                raise InvalidInputError("TLS is set up for gRPC; put an HTTPS proxy in front of HTTP")
            kwargs = {"ssl": True, "root_certificates": str(tls_root_cert)}
        self.client = tc.InferenceServerClient(url=url, **kwargs)
        self.headers = inference_headers(url, protocol, key)

    def is_ready(self, model: str) -> bool:
        return bool(self.client.is_model_ready(model, headers=self.headers))

    def metadata(self, model: str):
        return self.client.get_model_metadata(model, headers=self.headers)

    def io(self, model: str) -> ServedIO:
        """The served model's (first) input and output, from its metadata: any model, any names."""
        m = self.metadata(model)
        if self.protocol == "grpc":
            inp, out = m.inputs[0], m.outputs[0]
            return ServedIO(inp.name, inp.datatype, tuple(inp.shape), out.name)
        inp, out = m["inputs"][0], m["outputs"][0]
        return ServedIO(inp["name"], inp["datatype"], tuple(inp["shape"]), out["name"])

    def infer(self, model: str, images: np.ndarray, input_name: str | None = None,
              output_name: str | None = None) -> np.ndarray:  # fmt: skip
        """The model's output for a batch already in its input form; batches above the client's limit are
        sent in chunks. The tensor names default to the served model's own (from its metadata)."""
        if input_name is None or output_name is None:
            io = self.io(model)
            input_name, output_name = input_name or io.input, output_name or io.output
        images = np.asarray(images)
        outs = []
        for i in range(0, max(len(images), 1), self.max_batch_size):
            outs.append(self._infer_once(model, images[i : i + self.max_batch_size], input_name, output_name))
        return np.concatenate(outs)

    def _infer_once(self, model: str, x: np.ndarray, input_name: str, output_name: str) -> np.ndarray:
        inp = self.tc.InferInput(input_name, list(x.shape), _triton_dtype(x.dtype))
        if self.protocol == "http":
            inp.set_data_from_numpy(x, binary_data=True)
            out = self.tc.InferRequestedOutput(output_name, binary_data=True)
            result = self.client.infer(
                model, [inp], outputs=[out], timeout=int(self.timeout_s * 1e6), headers=self.headers
            )
        else:
            inp.set_data_from_numpy(x)
            result = self.client.infer(
                model,
                [inp],
                outputs=[self.tc.InferRequestedOutput(output_name)],
                client_timeout=self.timeout_s,
                headers=self.headers,
            )
        return result.as_numpy(output_name)

    def classify(self, model: str, images_uint8: np.ndarray) -> np.ndarray:
        """Predicted labels for uint8 NHWC images, sent in the bundled (zoo) models' input form (float32
        NCHW, their normalisation: ``to_tensor_batch``). A model of your own takes its own form: send it
        with ``infer`` after its ``Preprocess.apply`` (``serving.repository.protected_of`` reads the one the
        repository records)."""
        return self.infer(model, to_tensor_batch(images_uint8)).argmax(axis=1)

    def predictor(self, model: str, input_name: str | None = None, output_name: str | None = None):
        """A ``metrics.Predictor`` backed by this server model (names from its metadata unless given)."""
        if input_name is None or output_name is None:
            io = self.io(model)
            input_name, output_name = input_name or io.input, output_name or io.output
        return lambda x: self.infer(model, x, input_name, output_name)


def _triton_dtype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np.dtype(dtype))


def load_images(paths: Sequence[str | Path], size: int = 32) -> np.ndarray:
    """Image files -> uint8 (N, size, size, 3), resized where needed."""
    out = []
    for p in paths:
        with Image.open(p) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            out.append(np.asarray(img, dtype=np.uint8))
    return np.stack(out)
