"""Probe a `moechat worker` (ggml's RPC server) from Python before llama.cpp ever connects.

ggml aborts the whole process (SIGABRT, exit 134) when a worker it was told about is
unreachable or speaks another protocol version, so every worker is checked here first, over
a plain socket, with one clear MoechatError per problem. The probe also measures what the
planner needs: each device's memory (as ggml reports it), the round-trip time and the bulk
bandwidth of the link.

Hand-written because no library speaks ggml's RPC wire format. It follows ggml-rpc.cpp of
the vendored llama.cpp (protocol 7.0.0): a request is `cmd (u8) | size (u64) | payload`, a
reply `size (u64) | payload`, little endian; the first command must be HELLO (14), whose
request carries 24 transport-capability bytes (all zero: plain TCP). The server serves one
client at a time, so the probe closes its connection before llama.cpp opens its own.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from moechat.backends.errors import MoechatError

PROTO_MAJOR, PROTO_MINOR = 7, 0  # ggml-rpc.h of the llama.cpp llama-cpp-python 0.3.36 vendors
CMD_ALLOC_BUFFER, CMD_BUFFER_GET_BASE, CMD_FREE_BUFFER, CMD_SET_TENSOR = 0, 3, 4, 6
CMD_GET_DEVICE_MEMORY, CMD_HELLO, CMD_DEVICE_COUNT = 11, 14, 15
CONN_CAPS_SIZE = 24
RPC_TENSOR_SIZE = 296  # sizeof(rpc_tensor), packed
CONNECT_TIMEOUT_S = 3.0
REPLY_TIMEOUT_S = 10.0
LINK_TEST_BYTES = 8 * 1024**2  # one SET_TENSOR of this size measures the bulk bandwidth
RTT_ROUNDS = 20


@dataclass(frozen=True, slots=True)
class WorkerDevice:
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class WorkerLink:
    endpoint: str  # "host:port"
    version: tuple[int, int, int]
    devices: tuple[WorkerDevice, ...]
    rtt_s: float  # median round trip of a tiny request (0: not measured)
    link_gbs: float  # bulk bytes/s over the link, GB/s (0: not measured)


def parse_workers(text: str | None) -> tuple[str, ...]:
    """"host:port[,host:port...]" -> endpoints; a malformed entry is one clear error."""
    if not text:
        return ()
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise MoechatError(f"--workers: {item!r} is not host:port (e.g. 192.168.1.20:50052)")
        endpoints.append(f"{host}:{int(port)}")
    if len(set(endpoints)) != len(endpoints):
        raise MoechatError("--workers: the same worker is listed twice")
    return tuple(endpoints)


def probe_worker(endpoint: str, measure_link: bool = True) -> WorkerLink:
    """Connect, check the protocol version, read device memory; optionally time the link."""
    host, _, port = endpoint.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
    except OSError as err:
        raise MoechatError(f"worker {endpoint} is not reachable ({err.strerror or err}); "
                           f"start it there with `moechat worker --port {port}`") from None
    try:
        sock.settimeout(REPLY_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        version = _hello(sock, endpoint)
        (count,) = struct.unpack("<I", _call(sock, endpoint, CMD_DEVICE_COUNT, b"", 4))
        devices = tuple(
            WorkerDevice(*struct.unpack("<QQ", _call(sock, endpoint, CMD_GET_DEVICE_MEMORY,
                                                     struct.pack("<I", i), 16)))
            for i in range(count))
        rtt = link = 0.0
        if measure_link:
            rtt = _rtt(sock, endpoint)
            link = _bandwidth(sock, endpoint, rtt)
        return WorkerLink(endpoint, version, devices, rtt, link)
    except OSError as err:
        raise MoechatError(f"worker {endpoint} stopped answering ({err})") from None
    finally:
        sock.close()


# ---- wire format -------------------------------------------------------------------------------


def _hello(sock, endpoint) -> tuple[int, int, int]:
    try:
        reply = _call(sock, endpoint, CMD_HELLO, bytes(CONN_CAPS_SIZE), 4 + CONN_CAPS_SIZE)
    except TimeoutError:
        raise MoechatError(f"worker {endpoint} accepted the connection but did not answer within "
                           f"{REPLY_TIMEOUT_S:.0f} s: it is serving another moechat (a worker serves one "
                           f"at a time) or is not a ggml RPC worker") from None
    except (MoechatError, OSError):  # hung up, reset or silent: an RPC server of another version
        raise MoechatError(f"worker {endpoint} did not answer the RPC hello: it runs another "
                           f"RPC protocol than {PROTO_MAJOR}.{PROTO_MINOR}.x (another llama.cpp "
                           f"version) or is not a ggml RPC worker") from None
    major, minor, patch = reply[0], reply[1], reply[2]
    if major != PROTO_MAJOR or minor > PROTO_MINOR:
        raise MoechatError(f"worker {endpoint} speaks RPC protocol {major}.{minor}.{patch}; this "
                           f"llama.cpp needs {PROTO_MAJOR}.{PROTO_MINOR}.x: install the same "
                           f"llama-cpp-python version on both machines")
    return major, minor, patch


def _send(sock, cmd: int, payload: bytes) -> None:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)


def _call(sock, endpoint, cmd: int, payload: bytes, reply_size: int) -> bytes:
    _send(sock, cmd, payload)
    (size,) = struct.unpack("<Q", _recv(sock, endpoint, 8))
    if size != reply_size:
        raise MoechatError(f"worker {endpoint} sent a malformed reply ({size} bytes, expected {reply_size})")
    return _recv(sock, endpoint, reply_size)


def _recv(sock, endpoint, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise MoechatError(f"worker {endpoint} closed the connection")
        data += chunk
    return bytes(data)


def _rtt(sock, endpoint) -> float:
    times = []
    for _ in range(RTT_ROUNDS):
        t0 = time.perf_counter()
        _call(sock, endpoint, CMD_DEVICE_COUNT, b"", 4)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _bandwidth(sock, endpoint, rtt: float) -> float:
    """Bytes/s of one bulk SET_TENSOR into a scratch buffer on device 0, freed afterwards."""
    n = LINK_TEST_BYTES
    remote, size = struct.unpack("<QQ", _call(sock, endpoint, CMD_ALLOC_BUFFER, struct.pack("<IQ", 0, n), 16))
    if not remote or size < n:
        return 0.0  # the worker could not spare the scratch buffer: bandwidth unknown
    (base,) = struct.unpack("<Q", _call(sock, endpoint, CMD_BUFFER_GET_BASE, struct.pack("<Q", remote), 8))
    header = _f32_tensor(remote, base, n) + struct.pack("<BQ", 0, 0)  # cache flag, offset
    payload = header + bytes(n)
    t0 = time.perf_counter()
    _send(sock, CMD_SET_TENSOR, payload)  # no reply: a round trip after it marks its end
    _call(sock, endpoint, CMD_DEVICE_COUNT, b"", 4)
    seconds = max(time.perf_counter() - t0 - rtt, 1e-6)
    _send(sock, CMD_FREE_BUFFER, struct.pack("<Q", remote))
    _call(sock, endpoint, CMD_DEVICE_COUNT, b"", 4)
    return len(payload) / seconds / 1e9


def _f32_tensor(buffer: int, data: int, n_bytes: int) -> bytes:
    """A serialized rpc_tensor: a 1-D float32 tensor covering n_bytes at `data` in `buffer`.
    Layout: id u64, type u32, buffer u64, ne u32[4], nb u32[4], op u32, op_params i32[16],
    flags i32, src u64[10], view_src u64, view_offs u64, data u64, name char[64], use_count i32."""
    ne, nb = (n_bytes // 4, 1, 1, 1), (4, n_bytes, n_bytes, n_bytes)
    out = struct.pack("<QIQ4I4II16ii10QQQQ64si", 1, 0, buffer, *ne, *nb, 0, *([0] * 16), 0,
                      *([0] * 10), 0, 0, data, b"moechat-link-test", 0)
    assert len(out) == RPC_TENSOR_SIZE
    return out
