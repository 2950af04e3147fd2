"""moechat: local chat for Mixture-of-Experts models.

The code lives in three sub-packages mapped by pyproject.toml:
  moechat.app       (app/)       front ends: CLI, TUI, history
  moechat.backends  (backends/)  model files, planning, engines, runtime, offload; the manager
  moechat.kernels   (kernels/)   quantization and expert-compute kernels
"""

__version__ = "0.1.0"
