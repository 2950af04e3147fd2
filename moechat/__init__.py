"""moechat: local chat for Mixture-of-Experts models.

The code lives in three sub-packages mapped by pyproject.toml:
  moechat.app       (app/)       front ends: CLI, TUI, profiling, history
  moechat.backends  (backends/)  model card, manager, cost model, engines, model runtime
  moechat.kernels   (kernels/)   quantization and expert-compute kernels
"""

__version__ = "0.1.0"
