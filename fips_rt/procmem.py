"""Current and peak resident memory of this process (standard library only; no torch, no numpy).

One mechanism for everything that measures the memory a model costs (``fips_rt.exporter.memory``,
``fips_rt.runtime.bench``): on Linux the RSS is ``VmRSS`` and the peak ``VmHWM``, whose counter
``start_peak()`` resets to the current RSS (``/proc/self/clear_refs``), so the peak is the peak of
what follows. Elsewhere: psutil sampled every 2 ms when installed, else ``getrusage`` (the lifetime
peak, which is at least the true one). Values are bytes.
"""
from __future__ import annotations

import sys


def proc_status_bytes(key: str) -> int | None:
    """A ``/proc/self/status`` field given in kB (``VmRSS``, ``VmHWM``, ...), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ProcessMemory:
    """``rss()`` now, ``start_peak()`` then ``peak()``; ``method`` says how the peak is known
    ("VmHWM", "VmHWM (not reset)", "psutil-sampling" or "getrusage")."""

    def __init__(self):
        self.method = "VmHWM" if proc_status_bytes("VmHWM") is not None else None
        self._peak = 0
        self._stop = None
        self._psutil = None
        if self.method is None:
            try:
                import psutil
                self._psutil = psutil.Process()
                self.method = "psutil-sampling"
            except ImportError:
                self.method = "getrusage"

    @property
    def peak_is_exact(self) -> bool:
        """True when ``peak()`` is the peak since ``start_peak()`` (not a lifetime maximum)."""
        return self.method in ("VmHWM", "psutil-sampling")

    def rss(self) -> int:
        v = proc_status_bytes("VmRSS")
        if v is not None:
            return v
        if self._psutil is not None:
            return int(self._psutil.memory_info().rss)
        return self._maxrss()

    def start_peak(self) -> None:
        if self.method == "VmHWM":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak RSS to the current RSS
            except OSError:
                self.method = "VmHWM (not reset)"
        elif self.method == "psutil-sampling":
            import threading
            self._peak = self.rss()
            self._stop = threading.Event()

            def sample():
                while not self._stop.wait(0.002):
                    self._peak = max(self._peak, self.rss())
            threading.Thread(target=sample, daemon=True).start()

    def peak(self) -> int:
        if self.method.startswith("VmHWM"):
            return proc_status_bytes("VmHWM")
        if self.method == "psutil-sampling":
            self._peak = max(self._peak, self.rss())
            return self._peak
        return self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)


def release_freed_memory() -> None:
    """glibc: serve every allocation of 1 MiB or more by mmap (freed memory goes back to the system at
    once, instead of staying resident in the heap as the dynamic threshold lets buffers of up to 32 MiB
    do: calibration activations recorded batch by batch, per-tensor temporaries) and trim the heap now.
    A no-op elsewhere."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
