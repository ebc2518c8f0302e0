"""Writes fused_adamw.pt: a TorchScript function that calls PyTorch's fused AdamW kernel.

`torch._fused_adamw_` is the one kernel `torch.optim.AdamW(fused=True)` runs (transformers' default
optimizer since torch 2.8). tch 0.22 binds no `_fused_` or `_foreach_` operation, so odpo's libtorch
AdamW reaches it through this module, which `odpo_kernels` embeds and loads with `tch::CModule`.

    python crates/odpo-kernels/assets/make_fused_adamw.py   # torch >= 2.4 (CPU and CUDA kernels)
"""
import io
import pathlib
from typing import List, Optional

import torch


class FusedAdamW(torch.nn.Module):
    def forward(self, params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                exp_avg_sqs: List[torch.Tensor], steps: List[torch.Tensor], lr: float, beta1: float, beta2: float,
                weight_decay: float, eps: float):
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False, grad_scale=None,
                            found_inf=None)


def main():
    module = torch.jit.script(FusedAdamW())
    # Checked before writing: one step on a parameter against torch.optim.AdamW(fused=True).
    p = torch.randn(64)
    g = torch.randn(64)
    want = p.clone().requires_grad_()
    opt = torch.optim.AdamW([want], lr=1e-2, weight_decay=0.1, fused=True)
    want.grad = g.clone()
    opt.step()
    m, v = torch.zeros(64), torch.zeros(64)
    module([p], [g], [m], [v], [torch.tensor(1.0)], 1e-2, 0.9, 0.999, 0.1, 1e-8)
    assert torch.equal(p, want.detach()), "the module's step differs from torch.optim.AdamW(fused=True)"
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    out = pathlib.Path(__file__).with_name("fused_adamw.pt")
    out.write_bytes(buf.getvalue())
    print(f"wrote {out} ({len(buf.getvalue())} bytes, torch {torch.__version__})")


if __name__ == "__main__":
    main()
