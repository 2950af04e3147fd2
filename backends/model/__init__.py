"""Model files: the GGUF header and model card, name resolution, the hub, the catalogue and
the demo model. May import moechat.backends.errors/paths and moechat.kernels; no engine,
planner or front end."""
