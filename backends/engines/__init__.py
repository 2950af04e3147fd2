"""Engines: the Engine protocol, its Events, prompt/chat-template rendering, and one module per
engine (llama.cpp with its tensor overrides, torch, fiddler, hobbit). May import
moechat.backends.model/plan/runtime/offload and moechat.kernels; never a front end."""
