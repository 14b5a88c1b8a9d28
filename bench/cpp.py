"""The C++ runtime (cpp/, `make cpp`) from Python, through its C ABI (cpp/include/mistral_trt.h) with ctypes:
what `bench --cpp` measures, and how any Python program can embed the library.

    rt = CppRuntime("build/cpp/libmistral_trt.so", "build/onnx/smollm2-135m-instruct-fused-fp32")
    ids, text, stats, times = rt.generate([1, 2, 3], max_new_tokens=16)    # greedy
    rt.close()
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from mistral_trt.runtime.errors import UserError

ON_TOKEN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p, ctypes.c_size_t)
DEFAULT_LIBRARY = Path("build/cpp/libmistral_trt.so")


class Params(ctypes.Structure):
    _fields_ = [("max_new_tokens", ctypes.c_int32), ("temperature", ctypes.c_double), ("top_p", ctypes.c_double),
                ("top_k", ctypes.c_int32), ("repetition_penalty", ctypes.c_double), ("use_seed", ctypes.c_int32),
                ("seed", ctypes.c_uint64), ("stop", ctypes.POINTER(ctypes.c_char_p)), ("stop_count", ctypes.c_int32),
                ("ignore_eos", ctypes.c_int32), ("truncate", ctypes.c_int32)]


class Stats(ctypes.Structure):
    _fields_ = [("prompt_tokens", ctypes.c_int32), ("new_tokens", ctypes.c_int32),
                ("time_to_first_token_s", ctypes.c_double), ("decode_tokens_per_s", ctypes.c_double),
                ("stop_reason", ctypes.c_int32), ("cached_tokens", ctypes.c_int32)]


def load_library(path: str | Path = DEFAULT_LIBRARY):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; build the C++ runtime first (make cpp)")
    lib = ctypes.CDLL(str(path))
    lib.mtrt_open.restype = ctypes.c_void_p
    lib.mtrt_open.argtypes = [ctypes.c_char_p]
    lib.mtrt_last_error.restype = ctypes.c_char_p
    lib.mtrt_close.argtypes = [ctypes.c_void_p]
    lib.mtrt_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64),
                                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    lib.mtrt_generate.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t,
                                  ctypes.POINTER(Params), ON_TOKEN, ctypes.c_void_p, ctypes.POINTER(Stats),
                                  ctypes.POINTER(ctypes.c_double)]
    lib.mtrt_default_params.argtypes = [ctypes.POINTER(Params)]
    lib.mtrt_info.restype = ctypes.c_int64
    lib.mtrt_info.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.mtrt_session_open.restype = ctypes.c_void_p
    lib.mtrt_session_open.argtypes = [ctypes.c_void_p]
    lib.mtrt_session_append.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.mtrt_session_append_ids.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t]
    lib.mtrt_session_generate.argtypes = [ctypes.c_void_p, ctypes.POINTER(Params), ON_TOKEN, ctypes.c_void_p,
                                          ctypes.POINTER(Stats), ctypes.POINTER(ctypes.c_double)]
    lib.mtrt_session_reset.argtypes = [ctypes.c_void_p]
    lib.mtrt_session_close.argtypes = [ctypes.c_void_p]
    return lib


class CppRuntime:
    """One export opened by the C++ library; generate() is greedy unless told otherwise."""

    def __init__(self, library: str | Path, folder: str | Path):
        self.lib = load_library(library)
        self.handle = self.lib.mtrt_open(str(folder).encode())
        if not self.handle:
            raise UserError(self.lib.mtrt_last_error().decode())

    def generate(self, prompt, max_new_tokens: int, ignore_eos: bool = False, on_text=None):
        """-> (new ids, text, stats, seconds from the call to each new token)."""
        ids = (ctypes.c_int64 * len(prompt))(*[int(i) for i in prompt])
        p = Params()
        self.lib.mtrt_default_params(ctypes.byref(p))
        p.max_new_tokens, p.ignore_eos = max_new_tokens, int(ignore_eos)
        got, pieces = [], []

        @ON_TOKEN
        def on_token(user, tid, text, size):
            if tid >= 0:
                got.append(tid)
            piece = ctypes.string_at(text, size).decode()
            pieces.append(piece)
            if on_text:
                on_text(piece)
            return 0

        st, times = Stats(), (ctypes.c_double * max_new_tokens)()
        if self.lib.mtrt_generate(self.handle, ids, len(prompt), ctypes.byref(p), on_token, None, ctypes.byref(st), times):
            raise UserError(self.lib.mtrt_last_error().decode())
        return got, "".join(pieces), st, list(times)[:st.new_tokens]

    def time_tokens(self, prompt, n: int) -> list[float]:
        """Generate exactly n tokens (past EOS) with no callback: seconds from the call to each new token."""
        ids = (ctypes.c_int64 * len(prompt))(*[int(i) for i in prompt])
        p = Params()
        self.lib.mtrt_default_params(ctypes.byref(p))
        p.max_new_tokens, p.ignore_eos = n, 1
        times = (ctypes.c_double * n)()
        if self.lib.mtrt_generate(self.handle, ids, len(prompt), ctypes.byref(p), ON_TOKEN(), None, None, times):
            raise UserError(self.lib.mtrt_last_error().decode())
        return list(times)

    def close(self) -> None:
        if self.handle:
            self.lib.mtrt_close(self.handle)
            self.handle = None
