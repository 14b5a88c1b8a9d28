"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (no torch, no pycuda), and the
ColumnCache's storage in device memory.

    cuda = Cuda()
    name, cc = gpu_info(0)                          # ("NVIDIA H100 80GB HBM3", "9.0")
    storage = DeviceColumns(cuda, stream, tensors=2 * L, shape=(B, KV, D), capacity=4096, dtype=np.float16)
    cache = ColumnCache(storage, slots=B, capacity=4096, keep=None)     # runtime/cache.py: the same bookkeeping
"""
from __future__ import annotations

import numpy as np

from .cache import PointerColumns
from .errors import UserError


def check_cuda_versions(driver: int, runtime: int) -> None:
    """CUDA versions as CUDA reports them (12080 = 12.8). A CUDA 13 build (TensorRT 11.2+'s plain `tensorrt`
    wheel, cuda-python 13) on a driver that only knows CUDA 12 fails deep inside TensorRT; say it here."""
    if driver == 0:
        raise UserError("no NVIDIA driver found (cudaDriverGetVersion reports 0): this backend needs an NVIDIA GPU host")
    if driver // 1000 < runtime // 1000:
        d, r = f"{driver // 1000}.{driver % 1000 // 10}", f"{runtime // 1000}.{runtime % 1000 // 10}"
        raise UserError(f"the NVIDIA driver supports CUDA {d}, the installed TensorRT/cuda-python are built for CUDA {r}: "
                        f"pip install 'mistral-trt[tensorrt-cu{driver // 1000}]' (a matched pair), or update the driver "
                        f"(CUDA {runtime // 1000} needs r{580 if runtime // 1000 == 13 else 525}+)")


class Cuda:
    """The few CUDA runtime calls the backend needs, through cuda-python; errors become exceptions."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as rt  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart as rt  # older cuda-python
            except ImportError:
                raise UserError("cuda-python is not installed: pip install 'mistral-trt[tensorrt]'") from None
        self.rt = rt

    def check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorString(err)[1]
            raise RuntimeError(f"CUDA error {int(err)}: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else rest or None

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr))

    def stream(self):
        return self.check(self.rt.cudaStreamCreate())

    def h2d(self, dst: int, arr: np.ndarray, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(dst, arr.ctypes.data, arr.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def d2h(self, arr: np.ndarray, src: int, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(arr.ctypes.data, src, arr.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def d2h_2d(self, arr: np.ndarray, src: int, spitch: int, stream) -> None:
        """arr [height, width bytes] (contiguous) from `height` rows of device memory `spitch` bytes apart."""
        width = arr.nbytes // arr.shape[0]
        self.check(self.rt.cudaMemcpy2DAsync(arr.ctypes.data, width, src, spitch, width, arr.shape[0],
                                             self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def d2d_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None:
        self.check(self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                             self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))

    def sync(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream))


def gpu_info(device: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of CUDA device `device`."""
    cuda = Cuda()
    props = cuda.check(cuda.rt.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00"), f"{props.major}.{props.minor}"


def logits_to_host(cuda, src: int, shape: tuple[int, int, int], dtype, last: bool, stream) -> np.ndarray:
    """A left-padded graph's device logits [B, S, V] -> host. With `last`, only each row's last column (its last
    token's; left padding puts every row's there) comes over, in one strided copy: a 2048-token prefill of the
    demo copies 98 KB in fp16 instead of 201 MB. Returns [B, S, V], or [B, 1, V] with `last`."""
    b, s, v = shape
    if not last or s == 1:
        out = np.empty(shape, dtype)
        cuda.d2h(out, src, stream)
        return out
    out = np.empty((b, 1, v), dtype)
    row = v * out.itemsize
    cuda.d2h_2d(out.reshape(b, -1), src + (s - 1) * row, s * row, stream)
    return out


class DeviceColumns(PointerColumns):
    """runtime/cache.py's ColumnStorage in device memory: the same two sides and the same three calls, device
    pointers instead of numpy views, the window trim as one strided device-to-device copy per tensor."""

    def __init__(self, cuda: Cuda, stream, tensors: int, shape: tuple[int, int, int], capacity: int, dtype):
        self.cuda, self.stream, self.shape = cuda, stream, shape
        self.itemsize = np.dtype(dtype).itemsize
        b, h, d = shape
        n = b * h * capacity * d * self.itemsize
        self.sides = [[cuda.malloc(n) for _ in range(tensors)] for _ in range(2)]

    def keep_tail(self, src: int, dst: int, total: int, keep: int) -> None:
        b, h, d = self.shape
        row = d * self.itemsize  # one position of one head
        for s, t in zip(self.sides[src], self.sides[dst]):
            # [B*KV rows] x [last `keep` positions]: one strided copy per tensor
            self.cuda.d2d_2d(t, keep * row, s + (total - keep) * row, total * row, keep * row, b * h, self.stream)

    def close(self) -> None:
        for side in self.sides:
            for p in side:
                self.cuda.free(p)
        self.sides = [[], []]
