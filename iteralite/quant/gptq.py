"""GPTQ: column-by-column quantization with error feedback through the inverse Hessian."""
from __future__ import annotations

import torch

from iteralite.quant.intcodes import QTensor, group_codes, dequant_groups, group_params, quantize_rtn, stack_qtensors
from iteralite.quant.spec import QuantSpec, check_group_size


def _gptq_2d(w, H, bits, group_size, symmetric, damp, block_size):
    """GPTQ on w (out, in) with Hessian H = X^T X (in, in): quantize column by column and
    spread each column's error over the not-yet-quantized columns via the inverse Hessian."""
    out_dim, in_dim = w.shape
    H = H.detach().double().clone()
    diag = H.diagonal()
    if not (diag > 0).any():  # no calibration data reached this weight
        return quantize_rtn(w, bits, group_size, symmetric)
    dead = diag <= 0
    diag[dead] = 1.0  # never-active inputs: keep H invertible; their weights are quantized plainly
    diag += damp * diag.mean()
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # upper factor of H^-1
    W = w.detach().float().clone()
    G = in_dim // group_size
    codes = torch.zeros(out_dim, in_dim, dtype=torch.uint8)
    scales = torch.zeros(out_dim, G, dtype=torch.float16)
    zeros = None if symmetric else torch.zeros(out_dim, G, dtype=torch.float16)
    block = group_size * max(1, block_size // group_size)  # blocks hold whole groups
    for i1 in range(0, in_dim, block):
        i2 = min(i1 + block, in_dim)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # group params from the error-updated weights of this group
                s16, z16 = group_params(W1[:, i:i + group_size].unsqueeze(1), bits, symmetric)
                scales[:, col // group_size] = s16[:, 0]
                if zeros is not None:
                    zeros[:, col // group_size] = z16[:, 0]
            wc = W1[:, i].reshape(out_dim, 1, 1)
            q = group_codes(wc, s16, z16, bits, symmetric)
            dq = dequant_groups(q, s16, z16, bits, symmetric).reshape(out_dim)
            codes[:, col] = q.reshape(out_dim)
            e = (W1[:, i] - dq) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    return QTensor(codes, scales, zeros, None, bits, group_size, symmetric)


def quantize_gptq(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  *, damp: float = 0.01, block_size: int = 128, name: str = "weight") -> QTensor:
    """GPTQ. w (out, in) with H (in, in), or (e, out, in) with H (e, in, in); H = X^T X / n over
    calibration inputs of this weight. Same storage format as RTN."""
    QuantSpec(bits, group_size, symmetric, "gptq").validate()
    check_group_size(name, w.shape[-1], group_size)
    if H.shape != (*w.shape[:-2], w.shape[-1], w.shape[-1]):
        raise ValueError(f"gptq: Hessian for '{name}' has shape {tuple(H.shape)}, expected "
                         f"{(*w.shape[:-2], w.shape[-1], w.shape[-1])}")
    if w.dim() == 2:
        return _gptq_2d(w, H, bits, group_size, symmetric, damp, block_size)
    return stack_qtensors([_gptq_2d(w[e], H[e], bits, group_size, symmetric, damp, block_size)
                            for e in range(w.shape[0])])
