"""llama.cpp's RPC backend (ggml-rpc) through the ggml that libllama loaded.

`Llama(rpc_servers=...)` is accepted and ignored by llama-cpp-python 0.3.36 (upstream issue
#1914), so we run llama.cpp's own `--rpc` sequence: `ggml_backend_reg_by_name("RPC")` ->
`ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_add_server")` ->
`add_server("host:port")` -> `ggml_backend_register(...)`; the model then loads with
`n_gpu_layers`/`tensor_split` over the new devices. Every symbol is taken from
`llama_cpp.llama_cpp._lib` (libllama's handle, whose dlsym searches its dependencies): a
second `ctypes.CDLL` of libggml would be a second registry, where the devices appear but
every layer silently stays on the CPU.

`add_server` connects at once and ggml aborts the process on any failure, so callers probe
each worker with backends/plan/rpc_probe.py first. The worker side is
`ggml_backend_rpc_start_server`, exported by libggml-rpc.so: it serves in-process.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from moechat.backends.errors import MoechatError

REBUILD = ('CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir '
           'llama-cpp-python==0.3.36')
DEVICE_TYPE_CPU, DEVICE_TYPE_GPU, DEVICE_TYPE_ACCEL = 0, 1, 3  # enum ggml_backend_dev_type (IGPU = 2)


@dataclass(frozen=True, slots=True)
class LocalDevice:
    name: str  # ggml's device name: "CPU", "CUDA0", ...
    description: str
    free_bytes: int
    total_bytes: int
    is_cpu: bool


def _lib():
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    if not llama_cpp.llama_supports_rpc():
        raise MoechatError(f"this llama-cpp-python was built without RPC support; rebuild it with: {REBUILD}")
    handle = lib._lib
    for name, restype, argtypes in (
        ("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p]),
        ("ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        ("ggml_backend_register", None, [ctypes.c_void_p]),
        ("ggml_backend_dev_count", ctypes.c_size_t, []),
        ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
        ("ggml_backend_dev_memory", None, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                           ctypes.POINTER(ctypes.c_size_t)]),
    ):
        fn = getattr(handle, name)
        fn.restype, fn.argtypes = restype, argtypes
    return handle


def _rpc_proc(lib, name: str) -> int:
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    proc = reg and lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not proc:
        raise MoechatError(f"llama.cpp's RPC backend has no {name}; rebuild with: {REBUILD}")
    return proc


def rpc_device_names() -> list[str]:
    """Names of the RPC devices registered in this process, in registration order."""
    lib = _lib()
    names = (lib.ggml_backend_dev_name(lib.ggml_backend_dev_get(i)).decode()
             for i in range(lib.ggml_backend_dev_count()))
    return [n for n in names if n.startswith("RPC")]


def register_workers(endpoints: tuple[str, ...]) -> int:
    """Register each (already probed) worker's devices with ggml; returns how many RPC devices
    this process now has. Once per process: ggml keeps registrations until exit."""
    lib = _lib()
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(_rpc_proc(lib, "ggml_backend_rpc_add_server"))
    for endpoint in endpoints:
        reg = add_server(endpoint.encode())
        if not reg:
            raise MoechatError(f"llama.cpp could not add the RPC worker {endpoint}")
        lib.ggml_backend_register(reg)
    return len(rpc_device_names())


def local_devices() -> list[LocalDevice]:
    """This machine's ggml devices (what a worker can serve), with their memory."""
    lib = _lib()
    devices = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        name = lib.ggml_backend_dev_name(dev).decode()
        if name.startswith("RPC"):
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = lib.ggml_backend_dev_type(dev)
        devices.append(LocalDevice(name, lib.ggml_backend_dev_description(dev).decode(),
                                   free.value, total.value, kind in (DEVICE_TYPE_CPU, DEVICE_TYPE_ACCEL)))
    return devices


def served_devices() -> list[LocalDevice]:
    """What `moechat worker` serves: the GPUs if there are any, else the CPU (as
    llama.cpp's rpc-server chooses)."""
    devices = local_devices()
    gpus = [d for d in devices if not d.is_cpu]  # BLAS and other accelerators count as CPU
    return gpus or [d for d in devices if d.name == "CPU"][:1]


def start_server(endpoint: str, threads: int, cache_dir: str | None, devices: list[LocalDevice]) -> None:
    """Serve `devices` over ggml RPC on endpoint; blocks for the life of the process."""
    lib = _lib()
    by_name = {lib.ggml_backend_dev_name(lib.ggml_backend_dev_get(i)).decode(): lib.ggml_backend_dev_get(i)
               for i in range(lib.ggml_backend_dev_count())}
    handles = (ctypes.c_void_p * len(devices))(*(by_name[d.name] for d in devices))
    start = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                             ctypes.c_void_p)(_rpc_proc(lib, "ggml_backend_rpc_start_server"))
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, len(devices),
          ctypes.cast(handles, ctypes.c_void_p))
