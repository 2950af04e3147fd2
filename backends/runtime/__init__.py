"""A PyTorch MoE runtime that reads GGUF files in place (see docs/runtime.md). May import
moechat.backends.plan/model and moechat.kernels, never an engine or a front end.

`load_model(path)` gives a `Model` whose forward pass we control token by token; the routed
experts go through a pluggable `ExpertBackend` (experts.py) so that the Fiddler/HOBBIT
engines decide where each expert lives and in which precision.
"""

from moechat.backends.runtime.model import Model, load_model

__all__ = ["Model", "load_model"]
