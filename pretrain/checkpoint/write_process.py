"""A process of its own, per rank, that writes asynchronous checkpoint files, so that pickling and
copying into the page cache never hold the training process's GIL (a ZeRO-3 step runs Python
hooks around every block and stalls behind a writer thread that holds it).

The snapshot buffers live in anonymous shared memory (`memfd_create`), kept from one save to the
next: `SharedBuffers.empty` cuts tensors from slabs of it, and the writer process receives each
slab's file descriptor once (SCM_RIGHTS over a socket pair). A file to write travels as a
pickle in which every buffer tensor is a reference (persistent id); the process rebuilds the
tensors over its own mapping of the same memory and writes them with `write_file`. Nothing has a
name in /dev/shm, so a killed rank leaves no memory behind, and /dev/shm's size does not matter.
The process ends when its socket closes (its rank ended) or its rank dies (PR_SET_PDEATHSIG),
ignores the stop signals Slurm sends to every process of a step (its rank waits for the write in
flight), and writes at nice 19, without the zip records' CRC-32 (a third of a write's CPU time;
torch.load does not read it).

    python -m pretrain.checkpoint.write_process FD     # started by WriteProcess, not by hand
"""
from __future__ import annotations

import ctypes
import io
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading

import torch

from pretrain.checkpoint.writer import write_file

HEADER = struct.Struct("<QI")  # pickle length, number of file descriptors that came with it
MAX_FDS = 200  # per message (the kernel's SCM_MAX_FD is 253)
SLAB_BYTES = 256 * 2**20  # buffers are cut from slabs of shared memory: a few descriptors, not one per tensor
ALIGN = 64
POLL_S = 5.0  # how often a write waiting for the process checks that it is still alive


class SharedBuffers:
    """Tensors over anonymous shared memory that a WriteProcess can map: cut one after another from
    slabs (one memfd each), kept for the life of the run; used by the training thread (snapshots)
    and the writer thread (sending), hence the lock."""

    def __init__(self):
        self.slabs: list[mmap.mmap] = []  # slab id = index
        self.slab_fds: list[int] = []  # their memfds, sent to each new writer process
        self.free_from = 0  # first free byte of the last slab
        self.where: dict[int, tuple[int, int, int, torch.Tensor]] = {}  # id(tensor) -> (slab, offset, nbytes, tensor)
        self.lock = threading.Lock()

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        with self.lock:
            if not self.slabs or self.free_from + nbytes > len(self.slabs[-1]):
                self._new_slab(max(SLAB_BYTES, nbytes))
            slab, offset = len(self.slabs) - 1, self.free_from
            self.free_from = -(-(offset + nbytes) // ALIGN) * ALIGN
            tensor = torch.frombuffer(self.slabs[slab], dtype=torch.uint8, count=nbytes, offset=offset) \
                .view(dtype).view(shape)
            self.where[id(tensor)] = (slab, offset, nbytes, tensor)
        return tensor

    def _new_slab(self, nbytes: int) -> None:
        fd = os.memfd_create(f"monofusion-checkpoint-{len(self.slabs)}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            slab = mmap.mmap(fd, nbytes)
        except OSError:
            os.close(fd)
            raise
        if torch.cuda.is_available():  # pinned, for the asynchronous copies from the device
            cudart = torch.cuda.cudart()
            address = ctypes.addressof(ctypes.c_char.from_buffer(slab))
            if int(cudart.cudaHostRegister(address, nbytes, 0)) != 0:
                cudart.cudaGetLastError()  # clear it: the training thread must not meet it at its next kernel
                print("warning: checkpoint snapshot memory could not be pinned (copies from the GPU are "
                      "synchronous)", file=sys.stderr, flush=True)
        self.slabs.append(slab)
        self.slab_fds.append(fd)
        self.free_from = 0

    def free(self, tensor: torch.Tensor) -> None:
        """A buffer no longer used (the snapshot replaced it; its bytes stay in the slab: shapes rarely change)."""
        with self.lock:
            self.where.pop(id(tensor), None)

    def fds(self, start: int) -> list[int]:
        """The descriptors of slabs `start`, `start + 1`, ..."""
        with self.lock:
            return self.slab_fds[start:]


class WriteProcess:
    """The trainer's end: `write(path, obj)` returns once the process wrote and fsynced the file."""

    def __init__(self, buffers: SharedBuffers):
        self.buffers = buffers
        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", "pretrain.checkpoint.write_process", str(child.fileno()),
                                      str(os.getpid())], pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        self.sent = 0  # slabs the process has

    def write(self, path: str, obj) -> None:
        try:
            new = self.buffers.fds(self.sent)
            for i in range(0, len(new), MAX_FDS):
                _send(self.sock, ("slabs", self.sent + i, len(new[i:i + MAX_FDS])), new[i:i + MAX_FDS])
            self.sent += len(new)
            payload = io.BytesIO()
            _Pickler(payload, self.buffers).dump(obj)
            _send(self.sock, ("write", str(path), payload.getvalue()), [])
            while not select.select([self.sock], [], [], POLL_S)[0]:
                if self.proc.poll() is not None:
                    raise EOFError("no reply")
            reply, _ = _recv(self.sock)
        except (OSError, EOFError) as e:
            raise OSError(f"the checkpoint writer process ended (exit code {self.proc.poll()}): {e}") from None
        if reply is not None:
            raise OSError(reply)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class _Pickler(pickle.Pickler):
    def __init__(self, file, buffers: SharedBuffers):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.buffers = buffers

    def persistent_id(self, obj):
        if torch.is_tensor(obj) and id(obj) in self.buffers.where:
            slab, offset, nbytes, _ = self.buffers.where[id(obj)]
            return slab, offset, nbytes, str(obj.dtype).removeprefix("torch."), tuple(obj.shape)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, slabs: dict):
        super().__init__(file)
        self.slabs, self.tensors = slabs, {}

    def persistent_load(self, pid):
        slab, offset, nbytes, dtype, shape = pid  # a storage of exactly its bytes, so torch.save writes only them
        if (slab, offset) not in self.tensors:  # a tensor met twice (tied) stays one, as torch.save keeps it
            self.tensors[slab, offset] = torch.frombuffer(self.slabs[slab], dtype=torch.uint8, count=nbytes,
                                                          offset=offset).view(getattr(torch, dtype)).view(shape)
        return self.tensors[slab, offset]


def _send(sock: socket.socket, message, fds: list[int]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    socket.send_fds(sock, [HEADER.pack(len(data), len(fds))], fds)
    sock.sendall(data)


def _recv(sock: socket.socket):
    head, fds, flags, _ = socket.recv_fds(sock, HEADER.size, MAX_FDS)
    if not head:
        raise EOFError("socket closed")
    head += _read(sock, HEADER.size - len(head))
    size, count = HEADER.unpack(head)
    if len(fds) != count or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError(f"{count} file descriptors sent, {len(fds)} received (the process's limit on open files?)")
    return pickle.loads(_read(sock, size)), fds


def _read(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 24))
        if not chunk:
            raise EOFError("socket closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def serve(sock: socket.socket) -> None:
    """The writer process's loop: map slabs, write files, until the socket closes."""
    slabs: dict[int, mmap.mmap] = {}
    while True:
        try:
            message, fds = _recv(sock)
        except (EOFError, ConnectionResetError):
            return
        if message[0] == "slabs":
            for i, fd in enumerate(fds):
                slabs[message[1] + i] = mmap.mmap(fd, os.fstat(fd).st_size)
                os.close(fd)
            continue
        _, path, payload = message
        try:
            write_file(path, _Unpickler(io.BytesIO(payload), slabs).load())
            reply = None
        except Exception as e:
            reply = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        try:
            _send(sock, reply, [])
        except OSError:  # the rank is gone
            return


def _end_with(parent: int) -> None:
    """Die with the rank (SIGKILL when it dies: its checkpoint cannot be committed any more) and
    leave the rank's stop signals (Slurm signals every process of a step; Ctrl-C the process group)
    to the rank, which waits for the write in flight."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl
        os._exit(0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    _end_with(int(sys.argv[2]))
    os.nice(19)  # the write takes only what training leaves idle; no GIL is shared with it
    torch.serialization.set_crc32_options(False)  # a third of the CPU time of a write; torch.load never checks it
    serve(socket.socket(fileno=int(sys.argv[1])))
