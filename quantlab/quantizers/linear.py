"""``PackedLinear``: a linear layer stored in the GPTQ v1 tensor layout.

Persistent buffers (what the checkpoint holds, GPTQ names and dtypes):
  qweight int32 [in * bits / 32, out]  codes packed LSB-first along the input dim
  qzeros  int32 [n_groups, out * bits / 32]  zero points minus one (GPTQ "v1" convention)
  scales  float16 [n_groups, out]
  g_idx   int32 [in]  group of each input column
  bias    [out] (optional)

Execution: a loaded checkpoint's codes are unpacked once, at load, into a dense ``weight``
buffer (not saved) in the compute dtype, and ``forward`` is a plain ``F.linear``. On CPU this
is the fastest path PyTorch offers (no int4 GEMM kernel runs here), so speed equals the float
model's and the saving is on disk and in transfer; the results table labels it
``kernel=dense-dequant``. While a quantizer works, the layers it has finished with hold only
their packed buffers (``weight`` is None, see :func:`drop_dense_weights`) and dequantize in
each forward: quantizing never holds a dense copy of the weights beside the float model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.quantizers.grid import dequantize_matrix
from quantlab.quantizers.packing import pack_cols, pack_rows, unpack_cols, unpack_rows


class DenseDequantLinear(nn.Module):
    """Execution shared by the packed layouts: the codes are unpacked once into a dense
    ``weight`` buffer (not saved) and ``forward`` is ``F.linear``. Subclasses hold the
    packed buffers and implement :meth:`dequantize`."""

    kernel = "dense-dequant"
    weight: torch.Tensor | None
    #: dtype of the dense weight and of the computation
    compute_dtype: torch.dtype = torch.float32

    def dequantize(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the dense weight from the packed buffers (after loading a state dict)."""
        self.weight = self.dequantize().to(self.compute_dtype)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight [out, in]: the unpacked buffer, or dequantized now when the
        layer holds only its packed form."""
        return self.weight if self.weight is not None else self.dequantize().to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)


def drop_dense_weights(module: nn.Module) -> None:
    """Free the dense weights of the packed layers inside ``module`` (they keep working,
    dequantizing in each forward); quantizers call it on each decoder layer they finish."""
    for m in module.modules():
        if isinstance(m, DenseDequantLinear):
            m.weight = None


class PackedLinear(DenseDequantLinear):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.compute_dtype = dtype
        n_groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   g_idx: torch.Tensor, bits: int, group_size: int, bias: torch.Tensor | None,
                   dtype: torch.dtype, dense: bool = True) -> PackedLinear:
        """Build from codes [out, in], scales/zeros [n_groups, out] and g_idx [in]; with
        ``dense`` off the layer keeps only its packed buffers (quantizers, see above)."""
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, bits, group_size, bias is not None, dtype, device=codes.device)
        maxq = 2**bits - 1
        m.qweight.copy_(pack_rows(codes.t(), bits))
        # v1 convention: store zero - 1, wrapped into `bits` bits (a zero of 0 is stored as maxq)
        m.qzeros.copy_(pack_cols((zeros - 1) & maxq, bits))
        m.scales.copy_(scales.half())
        m.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            m.bias.data.copy_(bias.to(dtype))
        # the codes are at hand: no need to unpack what was just packed
        m.weight = dequantize_matrix(codes, m.scales, zeros, g_idx).to(dtype) if dense else None
        return m

    def codes(self) -> torch.Tensor:
        return unpack_rows(self.qweight, self.bits, self.in_features).t()

    def zeros(self) -> torch.Tensor:
        return (unpack_cols(self.qzeros, self.bits, self.out_features) + 1) & (2**self.bits - 1)

    def dequantize(self) -> torch.Tensor:
        """The dense weight [out, in] in float32 that the packed tensors encode."""
        return dequantize_matrix(self.codes(), self.scales, self.zeros(), self.g_idx)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, kernel={self.kernel}")
