"""Planning: the machine's hardware profile (probes and the profile record), the cost model
and the planner that ranks engine configurations. May import moechat.backends.model and
moechat.kernels; never an engine or a front end."""
