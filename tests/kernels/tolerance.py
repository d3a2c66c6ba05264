"""The one tolerance policy of the kernel tests, for continuous outputs (discrete outputs compare exactly).

A kernel's continuous output (a confidence) is compared with its torch reference in the SAME dtype. Both
compute in fp32 and round once to the output dtype, and only the fp32 summation order differs (a few fp32
ulps), so after rounding they agree to within one ulp of the output dtype; ``CONF_TOL`` states exactly that
(fp32: a few hundred fp32 ulps of slack for long reductions). A second, dtype-free bar follows
flash-attention: against a float64 truth, the kernel's error may be at most twice torch's own error in the
same dtype (plus one fp32 ulp of slack). Tolerances are never widened to make a test pass.
"""

from __future__ import annotations

import torch

__all__ = ["CONF_TOL", "assert_conf_close", "assert_at_most_2x_torch_error", "rel_rms"]

# rtol: one ulp of the dtype at 1.0 (bf16 2**-7, fp16 2**-10); fp32: summation-order noise over V <= 2**17.
CONF_TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 2e-5, "atol": 1e-7},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-7},
    torch.float16: {"rtol": 2**-10, "atol": 1e-7},
}


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error ``||a - e|| / ||e||`` in float64 (0 when both are zero)."""
    a, e = actual.double(), expected.double()
    den = e.norm().item()
    num = (a - e).norm().item()
    return num / den if den else num


def assert_conf_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "conf") -> None:
    """``actual`` vs ``expected`` (same dtype) under ``CONF_TOL``; the message prints the worst element."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    tol = CONF_TOL[expected.dtype]
    a, e = actual.double().cpu(), expected.double().cpu()
    diff = (a - e).abs()
    worst = int(diff.flatten().argmax()) if diff.numel() else 0
    msg = (f"{what} ({expected.dtype}): max |diff| {diff.max().item():.3e} at flat index {worst} "
           f"(actual {a.flatten()[worst].item()!r}, expected {e.flatten()[worst].item()!r}), "
           f"rel-RMS {rel_rms(a, e):.3e}, tolerance {tol}")
    torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"], equal_nan=False, msg=msg)


def assert_at_most_2x_torch_error(actual: torch.Tensor, torch_same_dtype: torch.Tensor, truth: torch.Tensor,
                                  what: str = "conf") -> None:
    """Max error of ``actual`` against the float64 ``truth`` <= 2x that of plain torch in the same dtype,
    plus one fp32 ulp of the largest value for outputs torch happens to get exactly right."""
    t = truth.double().cpu()
    err = (actual.double().cpu() - t).abs().max().item()
    torch_err = (torch_same_dtype.double().cpu() - t).abs().max().item()
    slack = torch.finfo(torch.float32).eps * t.abs().max().item()
    assert err <= 2 * torch_err + slack, (f"{what}: kernel error {err:.3e} > 2 x torch's {torch_err:.3e} "
                                          f"(+ slack {slack:.1e}) against the float64 truth")
