"""Stand-ins for what only a CUDA machine has, so the CUDA-only paths run in CI on a CPU.

- `fake_cuda`: torch's FakeTensorMode, in which tensors and modules can sit on device 'cuda' without
  a GPU; every op checks that its inputs agree on the device, and computes shapes and dtypes only
  (no values: backward, autocast and host reads of device values do not run there).
- `install_apex`: a stand-in for NVIDIA apex, which builds only with CUDA (the PyPI package named
  'apex' is an unrelated project). Its FusedLAMB is timm's LAMB behind apex's interface: the same
  constructor arguments, the 'requires cuda extensions' error of a Python-only build, and
  `zero_grad(self)` without the set_to_none argument.
- `install_flash_attn`: a stand-in for flash-attn (CUDA only): `flash_attn_func` on (B, N, heads, hd)
  tensors, fp16/bf16 only, returning the inputs' dtype, as the real kernels do.
"""
import contextlib
import sys
import types

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from timm.optim import Lamb


@contextlib.contextmanager
def fake_cuda(monkeypatch):
    """FakeTensorMode for a block: build modules and host tensors before it, move them to 'cuda' inside.

    A real CPU tensor's .numpy() inside the mode would hand back a fake tensor's (garbage) memory;
    here it reads the host tensor, as it does on a GPU machine."""
    host_numpy = torch.Tensor.numpy

    def numpy_on_the_host(self, *args, **kwargs):
        with unset_fake_temporarily():
            return host_numpy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, 'numpy', numpy_on_the_host)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def install_apex(monkeypatch, cuda_kernels: bool = True):
    """sys.modules['apex'] and the two submodules main.py reads; returns the FusedLAMB class.
    cuda_kernels=False is a Python-only build: it imports, but FusedLAMB(...) raises."""
    applier = types.SimpleNamespace(available=cuda_kernels)

    class FusedLAMB(Lamb):
        def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
                     weight_decay=0.01, amsgrad=False, adam_w_mode=True, grad_averaging=True,
                     set_grad_none=True, max_grad_norm=1.0, use_nvlamb=False):
            if not applier.available:
                raise RuntimeError('apex.optimizers.FusedLAMB requires cuda extensions')
            super().__init__(params, lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                             weight_decay=weight_decay, grad_averaging=grad_averaging, max_grad_norm=max_grad_norm)
            self.set_grad_none = set_grad_none

        def zero_grad(self):  # apex's signature: no set_to_none argument
            for group in self.param_groups:
                for p in group['params']:
                    p.grad = None

    apex = types.ModuleType('apex')
    apex.optimizers = types.ModuleType('apex.optimizers')
    apex.optimizers.FusedLAMB = FusedLAMB
    apex.multi_tensor_apply = types.ModuleType('apex.multi_tensor_apply')
    apex.multi_tensor_apply.multi_tensor_applier = applier
    for name, module in (('apex', apex), ('apex.optimizers', apex.optimizers),
                         ('apex.multi_tensor_apply', apex.multi_tensor_apply)):
        monkeypatch.setitem(sys.modules, name, module)
    return FusedLAMB


def install_flash_attn(monkeypatch):
    """sys.modules['flash_attn'] with flash_attn_func; returns the list of dtypes it was called with."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError('FlashAttention only supports fp16 and bf16 data type')
        calls.append(q.dtype)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), dropout_p=dropout_p)
        return out.transpose(1, 2)  # (B, N, heads, hd), in the inputs' dtype

    module = types.ModuleType('flash_attn')
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, 'flash_attn', module)
    return calls
