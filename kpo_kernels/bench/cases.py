"""The shapes `python -m kpo_kernels` measures, and the bytes a fused step must move."""

from dataclasses import dataclass

import torch

LONG_ROWS = 16384  # T above this: the "few long rows" regime
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Case:
    rows: int
    length: int
    dtype: torch.dtype = torch.float32

    @property
    def dtype_name(self):
        return DTYPE_NAMES[self.dtype]

    @property
    def label(self):
        return f"{self.rows}x{self.length} {self.dtype_name}"

    @property
    def tokens(self):
        return self.rows * self.length

    @property
    def regime(self):
        return "long rows" if self.length > LONG_ROWS else "short rows"


def fused_bytes(case):
    """Bytes a fused forward+backward must move: read log_prob, old_log_prob (B T each, input
    dtype), mask (B T bool), advantages (B); write the gradient (B T, input dtype)."""
    size = torch.empty((), dtype=case.dtype).element_size()
    return case.tokens * (3 * size + 1) + case.rows * size


def default_cases(device):
    """The default run: under a minute on a 2-core CPU; on a GPU it adds the issue's goal shape."""
    if device.type == "cuda":
        return [
            Case(64, 4096),
            Case(512, 8192),
            Case(512, 8192, torch.bfloat16),
            Case(2, 131072),
        ]
    return [Case(16, 1024), Case(64, 4096), Case(2, 131072)]


def sweep_cases(device):
    """`--full`: many short rows and few long rows, float32 and bfloat16."""
    if device.type == "cuda":
        short = [(b, t) for b in (256, 512, 1024) for t in (1024, 2048, 4096, 8192)]
        long = [(b, t) for b in (1, 2, 4, 8) for t in (32768, 65536, 131072)]
    else:  # sized for a few minutes on a small CPU
        short = [(b, t) for b in (16, 64, 256) for t in (1024, 4096, 8192)]
        long = [(b, t) for b in (1, 2) for t in (32768, 131072)]
    return [Case(b, t, dtype) for dtype in (torch.float32, torch.bfloat16) for b, t in short + long]


ACCURACY_ROWS = 4
ACCURACY_LENGTHS = (256, 1024, 4096, 16384, 32768, 65536, 131072)


def accuracy_cases(max_length=max(ACCURACY_LENGTHS), rows=ACCURACY_ROWS):
    """The accuracy sweep (errors only, no timing): a few float32 rows at each length up to
    max_length, so that the error of each implementation can be read against T."""
    lengths = [t for t in ACCURACY_LENGTHS if t <= max_length] or [max_length]
    return [Case(rows, t) for t in lengths]
