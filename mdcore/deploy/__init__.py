"""Deployable variants of a multi-domain model: ONNX export, int8 quantization with ONNX Runtime,
structured pruning, distillation into a smaller student, and their measurement (accuracy per domain,
corruptions, MACs, latency). A variant is an ONNX file plus a JSON recipe; never a pickled module."""
