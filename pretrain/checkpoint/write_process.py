"""A process of its own, per rank, that writes asynchronous checkpoint files, so that pickling and
copying into the page cache never hold the training process's GIL (a ZeRO-3 step runs Python
hooks around every block and stalls behind a writer thread that holds it).

The snapshot buffers live in anonymous shared memory (`memfd_create`), kept from one save to the
next: `SharedBuffers.empty` hands out tensors over them, and the writer process receives each
buffer's file descriptor once (SCM_RIGHTS over a socket pair). A file to write travels as a
pickle in which every buffer tensor is a reference (persistent id); the process rebuilds the
tensors over its own mapping of the same memory and writes them with `write_file`. Nothing has a
name in /dev/shm, so a killed rank leaves no memory behind, and /dev/shm's size does not matter.
The process ends when its socket closes (its rank ended or died) and writes at nice 19, without
the zip records' CRC-32 (a third of a write's CPU time; torch.load does not read it).

    python -m pretrain.checkpoint.write_process FD     # started by WriteProcess, not by hand
"""
from __future__ import annotations

import io
import mmap
import os
import pickle
import socket
import struct
import subprocess
import sys

import torch

from pretrain.checkpoint.writer import write_file

HEADER = struct.Struct("<QI")  # pickle length, number of file descriptors that came with it
MAX_FDS = 200  # per message (the kernel's SCM_MAX_FD is 253)


class SharedBuffers:
    """Tensors over anonymous shared memory, each a buffer of its own that a WriteProcess can map."""

    def __init__(self):
        self.fds: dict[int, int] = {}  # buffer id -> memfd
        self.by_tensor: dict[int, tuple[int, torch.Tensor]] = {}  # id(tensor) -> (buffer id, tensor)
        self.released: list[int] = []
        self.next_id = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        fd = os.memfd_create(f"monofusion-checkpoint-{self.next_id}", os.MFD_CLOEXEC)
        os.ftruncate(fd, nbytes)
        tensor = torch.frombuffer(mmap.mmap(fd, nbytes), dtype=torch.uint8).view(dtype).view(shape)
        if torch.cuda.is_available():  # pinned, for the asynchronous copy from the device
            torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)
        self.fds[self.next_id] = fd
        self.by_tensor[id(tensor)] = (self.next_id, tensor)
        self.next_id += 1
        return tensor

    def free(self, tensor: torch.Tensor) -> None:
        """A buffer no longer used (the snapshot replaced it)."""
        entry = self.by_tensor.pop(id(tensor), None)
        if entry is not None:
            os.close(self.fds.pop(entry[0]))
            self.released.append(entry[0])


class WriteProcess:
    """The trainer's end: `write(path, obj)` returns once the process wrote and fsynced the file."""

    def __init__(self, buffers: SharedBuffers):
        self.buffers = buffers
        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", "pretrain.checkpoint.write_process", str(child.fileno())],
                                     pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        self.sent: set[int] = set()  # buffers the process has

    def write(self, path: str, obj) -> None:
        released, self.buffers.released = self.buffers.released, []
        self.sent -= set(released)
        new = [b for b in self.buffers.fds if b not in self.sent]
        for i in range(0, len(new), MAX_FDS):
            chunk = new[i:i + MAX_FDS]
            _send(self.sock, ("buffers", chunk), [self.buffers.fds[b] for b in chunk])
            self.sent.update(chunk)
        payload = io.BytesIO()
        _Pickler(payload, self.buffers).dump(obj)
        try:
            _send(self.sock, ("write", str(path), payload.getvalue(), released), [])
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
        if torch.is_tensor(obj) and id(obj) in self.buffers.by_tensor:
            return self.buffers.by_tensor[id(obj)][0], str(obj.dtype).removeprefix("torch."), tuple(obj.shape)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, maps: dict):
        super().__init__(file)
        self.maps, self.tensors = maps, {}

    def persistent_load(self, pid):
        buffer_id, dtype, shape = pid  # a storage of its own per buffer, so torch.save writes only it
        if buffer_id not in self.tensors:  # a tensor met twice (tied) stays one, as torch.save keeps it
            self.tensors[buffer_id] = torch.frombuffer(self.maps[buffer_id], dtype=torch.uint8) \
                .view(getattr(torch, dtype)).view(shape)
        return self.tensors[buffer_id]


def _send(sock: socket.socket, message, fds: list[int]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    socket.send_fds(sock, [HEADER.pack(len(data), len(fds))], fds)
    sock.sendall(data)


def _recv(sock: socket.socket):
    head, fds, _, _ = socket.recv_fds(sock, HEADER.size, MAX_FDS)
    if not head:
        raise EOFError("socket closed")
    head += _read(sock, HEADER.size - len(head))
    size, _ = HEADER.unpack(head)
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
    """The writer process's loop: map buffers, write files, until the socket closes."""
    maps: dict[int, mmap.mmap] = {}
    while True:
        try:
            message, fds = _recv(sock)
        except (EOFError, ConnectionResetError):
            return
        if message[0] == "buffers":
            for buffer_id, fd in zip(message[1], fds):
                maps[buffer_id] = mmap.mmap(fd, os.fstat(fd).st_size)
                os.close(fd)
            continue
        _, path, payload, released = message
        for buffer_id in released:
            maps.pop(buffer_id, None)
        try:
            write_file(path, _Unpickler(io.BytesIO(payload), maps).load())
            reply = None
        except Exception as e:
            reply = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        _send(sock, reply, [])


if __name__ == "__main__":
    os.nice(19)  # the write takes only what training leaves idle; no GIL is shared with it
    torch.serialization.set_crc32_options(False)  # a third of the CPU time of a write; torch.load never checks it
    serve(socket.socket(fileno=int(sys.argv[1])))
