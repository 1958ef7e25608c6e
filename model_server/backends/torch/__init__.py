"""The PyTorch backend: runner, sampling on the device, weight loading and quantization."""
