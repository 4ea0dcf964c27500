"""Model I/O: cut a model into head and tail, export ONNX (and TensorRT engines), fuse the repair in."""
