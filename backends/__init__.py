"""Everything between a front end and the kernels: model files, planning, engines, runtime.

Rooms: model/ (GGUF files, names, hub, catalogue, demo), plan/ (hardware profile, cost
model, planner), engines/ (the Engine protocol and one module per engine), runtime/ (the
PyTorch MoE runtime), offload/ (expert offloading). manager.py is the one door the front ends
use. May import moechat.kernels, never the front ends (app/). Nothing here imports torch or textual at
module level.
"""
