"""The CUDA-only paths on fake CUDA tensors (tests/cuda_stubs.fake_cuda): a CPU machine places tensors
and modules on device 'cuda', and every op checks that its inputs agree on the device, so a tensor
left on (or created on) the CPU in a CUDA path fails here as it would on a GPU. Shapes and dtypes are
computed, values are not: backward, autocast and host reads of device values do not run."""
from collections import Counter

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

import gpu_augment
import main
import models_vit5  # noqa: F401  (registers vit5_*)
from cuda_stubs import fake_cuda, install_flash_attn
from tinyrun import parse

TINY = dict(depth=2, embed_dim=48, num_heads=2, img_size=32, num_classes=5)
CUDA = torch.device('cuda', 0)

ABLATIONS = [dict(), dict(norm_layer='layer'), dict(init_values=None), dict(qk_norm=False), dict(rope=False),
             dict(reg_rope=False), dict(num_registers=0), dict(abs_pos_embed=False), dict(qkv_bias=True),
             dict(mlp_type='swiglu'), dict(attn_backend='eager'), dict(global_pool='avg')]


@pytest.mark.parametrize('name, kwargs', [('vit5_tiny', k) for k in ABLATIONS] + [('deit_small_patch16_LS', {})],
                         ids=lambda v: str(v) if isinstance(v, str) else '-'.join(f'{k}={x}' for k, x in v.items()))
def test_model_forward_train_and_eval(monkeypatch, name, kwargs):
    model = timm.create_model(name, **TINY, **kwargs)
    with fake_cuda(monkeypatch):
        model = model.to('cuda')
        x = torch.randn(2, 3, 32, 48, device='cuda')  # not square: a 2 x 3 patch grid
        y = model(x)
        model.eval()
        with torch.no_grad():
            z = model(x)
    assert y.shape == z.shape == (2, 5) and y.device == z.device == CUDA
    for key in model._rope_cache:  # the tables were built on the GPU
        assert key[:4] == (2, 3, CUDA, torch.float32)


def test_forward_intermediates(monkeypatch):
    model = timm.create_model('vit5_tiny', **TINY)
    with fake_cuda(monkeypatch):
        model = model.to('cuda')
        final, maps = model.forward_intermediates(torch.randn(2, 3, 32, 48, device='cuda'), indices=[0, 1])
        pairs = model.forward_intermediates(torch.randn(2, 3, 48, 32, device='cuda'), indices=1, output_fmt='NLC',
                                            return_prefix_tokens=True, intermediates_only=True)
    assert final.shape == (2, 1 + 4 + 6, 48) and [m.shape for m in maps] == [(2, 48, 2, 3)] * 2
    assert [(p.shape, t.shape) for p, t in pairs] == [((2, 6, 48), (2, 5, 48))]
    assert all(t.device == CUDA for t in (final, *maps, *pairs[0]))


def test_training_forward_after_an_inference_mode_forward(monkeypatch):
    """Item 5: the RoPE tables cached under torch.inference_mode() are ordinary tensors, so the plain
    (CUDA) rotation of a training forward at the same size can save them for its backward."""
    model = timm.create_model('vit5_tiny', **TINY)
    with fake_cuda(monkeypatch):
        model = model.to('cuda')
        x = torch.randn(2, 3, 32, 32, device='cuda')
        with torch.inference_mode():
            model.eval()(x)
        y = model.train()(x)
    assert y.requires_grad and y.device == CUDA


def test_flash_backend_in_float32(monkeypatch):
    """Item 6: --flash without autocast. flash-attn runs in bf16; the block gets float32 back for its
    proj Linear (a float32 proj with a bf16 input fails). flash-attn is a stand-in here (CUDA only)."""
    calls = install_flash_attn(monkeypatch)
    model = timm.create_model('vit5_tiny', **TINY, attn_backend='flash_attn')
    proj_inputs = []  # (fake tensors do not check a Linear's input dtype against its weight's: CUDA does)
    for blk in model.blocks:
        blk.attn.proj.register_forward_pre_hook(lambda m, args: proj_inputs.append(args[0].dtype))
    with fake_cuda(monkeypatch):
        model = model.to('cuda')
        y = model(torch.randn(2, 3, 32, 48, device='cuda'))
    assert y.dtype == torch.float32 and y.shape == (2, 5) and calls == [torch.bfloat16] * 2
    assert proj_inputs == [torch.float32] * 2


class HostToDevice(TorchFunctionMode):
    """Records every copy of a CPU tensor to the GPU made through Tensor.to: (shape, non_blocking)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args[0].device.type == 'cpu':
            target = kwargs.get('device', args[1] if len(args) > 1 else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == 'cuda':
                self.copies.append((tuple(args[0].shape), kwargs.get('non_blocking', False)))
        return func(*args, **kwargs)


def batches(size=32):
    """A ThreeAugment batch (some crops blurred) and an evaluation batch of 6 noise images, as collated."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((40, 60), (70, 50), (33, 90), (64, 64), (90, 40), (50, 50))]
    torch.manual_seed(2)  # the draws' generator: one blur, grayscale and solarize each among the six
    train = gpu_augment.collate([(gpu_augment.ThreeAugmentDraw(size)(im), 0) for im in images])
    assert set(train[1][:, gpu_augment.OP].tolist()) == {0, 1, 2}
    return train, gpu_augment.collate([(gpu_augment.EvalResizeDraw(size)(im), 0) for im in images])


def test_device_augment_train_and_eval_batch(monkeypatch):
    """Slow 2 as well: every host-to-GPU copy is non-blocking (pinned on a GPU), and mean / std go over once."""
    augment = gpu_augment.DeviceAugment(32)
    train, val = batches()
    out, copies = [], []
    with fake_cuda(monkeypatch):
        for rows, params, _ in (train, val):
            rows = rows.to('cuda')
            with HostToDevice() as recorded:
                out.append(augment(rows, params))
            copies.append(recorded.copies)
    assert [(o.shape, o.device, o.dtype) for o in out] == [((6, 3, 32, 32), CUDA, torch.float32)] * 2
    assert all(non_blocking for copy in copies for _, non_blocking in copy), copies
    assert Counter(shape for shape, _ in copies[0])[(1, 3, 1, 1)] == 2  # mean and std, the first time only
    assert (1, 3, 1, 1) not in [shape for shape, _ in copies[1]]


def test_ema_on_the_cpu_copies_the_model_in_one_foreach_copy(monkeypatch):
    """Slow 5: --model-ema-force-cpu with the model on the GPU. timm copies each of the ~30 tensors of
    this model with its own blocking .to(); main.HostModelEma queues one foreach copy."""
    model = timm.create_model('vit5_tiny', **TINY)
    ema = main.build_ema(parse(['--model-ema-force-cpu']), model)
    ema.foreach = False  # what timm sets when the EMA and the model are on different devices
    calls = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.to, torch._foreach_copy_, torch.Tensor.copy_):
                calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with fake_cuda(monkeypatch):
        model = model.to('cuda')
        with Record():
            ema.update(model)
    assert calls == ['_foreach_copy_'] and len(model.state_dict()) > 20
