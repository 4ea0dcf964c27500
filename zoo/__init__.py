"""The attack zoo and training: datasets, architectures, attacks (one per file), the training loop,
CA / ASR / PA. For the demo and the benchmarks; the protection pipeline never needs it for a user model."""
