"""Expert offloading machinery shared by the Fiddler-style and HOBBIT-style engines.

One module per idea: routing traces, counters, devices/staging/streams, and the pure
policy functions of each engine (placement and cost decisions; loading precision, cache
priority, prefetch). Everything here runs on the CPU when there is no GPU. May import
moechat.backends.runtime/plan/model and moechat.kernels; the engines built on it live in
backends/engines/.
"""
