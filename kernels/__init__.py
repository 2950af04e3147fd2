"""Kernels: quantized blocks dequantized (dequant.py, lowbit.py) and ggml's CPU kernels called
on a GGUF's bytes in place (ggml.py: the ctypes route, weights and backend; ggml_ops.py: the op
graphs). The bottom room: imports nothing of moechat."""
