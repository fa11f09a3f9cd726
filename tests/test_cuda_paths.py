"""The paths main.py takes only on a GPU cluster, checked on a CPU: NVIDIA apex and
flash-attn through stand-ins (tests/cuda_stubs.py; both build only with CUDA), the CUDA calls main.py
makes through recording stand-ins, DDP through gloo. tests/test_fake_cuda.py runs the rest on fake
CUDA tensors; scripts/gpu_report.py's `cuda_paths` section shows what only a real GPU can."""
import builtins
import datetime
import json
import socket
import sys
from collections import Counter

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.optim import Lamb
from torch.overrides import TorchFunctionMode

import engine
import gpu_augment
import main
import models_vit5
import utils
from cuda_stubs import install_apex, install_flash_attn
from losses import CosubLoss
from tinyrun import TINY, make_image_folder, parse, run_cli

TINY_MODEL = dict(depth=2, embed_dim=48, num_heads=2, img_size=32, num_classes=3)
CPU = torch.device('cpu')
NO_SCALER = torch.amp.GradScaler('cpu', enabled=False)


def tiny_vit5():
    torch.manual_seed(0)
    return timm.create_model('vit5_tiny', **TINY_MODEL)


def linear_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, generator=g), torch.randint(0, 2, (2,), generator=g)) for _ in range(n)]


def cross_entropy(inputs, outputs, targets):
    return F.cross_entropy(outputs, targets)


# ---- 1, 2: apex FusedLAMB -------------------------------------------------------------------------
def apex_optimizer(monkeypatch, model):
    """main.build_optimizer(--opt fusedlamb) as on a CUDA machine (timm's factory insists on CUDA for apex)."""
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, 'is_available', lambda: True)
        return main.build_optimizer(parse(['--opt', 'fusedlamb', '--lr', 0.1]), model, torch.device('cuda'))


def test_fusedlamb_trains_despite_apexs_zero_grad_signature(monkeypatch):
    """Item 1: apex's FusedLAMB.zero_grad(self) takes no set_to_none; the training step clears the
    gradients itself (engine.clear_grads)."""
    fused_lamb = install_apex(monkeypatch)
    model = nn.Linear(3, 2)
    optimizer = apex_optimizer(monkeypatch, model)
    assert type(optimizer) is fused_lamb
    start = model.weight.detach().clone()
    engine.train_one_epoch(model, cross_entropy, linear_batches(3), optimizer, CPU, 0, NO_SCALER, accum_iter=2)
    assert all(p.grad is None for p in model.parameters()) and not torch.equal(model.weight, start)


def test_python_only_apex_build_falls_back_to_timms_lamb(monkeypatch, capsys):
    """Item 2: apex imports, but without its CUDA extensions FusedLAMB(...) raises; main.py checks
    multi_tensor_applier.available first and runs timm's LAMB with its one notice line."""
    install_apex(monkeypatch, cuda_kernels=False)
    optimizer = apex_optimizer(monkeypatch, nn.Linear(3, 2))
    assert type(optimizer) is Lamb
    assert capsys.readouterr().out.count("runs timm's LAMB") == 1


# ---- 3, 7: combinations PyTorch bugs break, refused at the start -------------------------------------
def refusal(argv, capsys):
    capsys.readouterr()
    assert main.cli([str(a) for a in argv + ['--device', 'cpu']]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ')
    return err


def test_static_graph_with_accumulation_is_refused(capsys):
    """Item 3: DDP's no_sync fails under static_graph (pytorch/pytorch#143580)."""
    err = refusal(['--ddp-static-graph', '--accum_iter', 2], capsys)
    assert '--ddp-static-graph' in err and '--accum_iter 2' in err and '143580' in err
    main.check_args(parse(['--ddp-static-graph']))  # alone: fine
    main.check_args(parse(['--accum_iter', 4]))


@pytest.mark.parametrize('mode', ('reduce-overhead', 'max-autotune'))
def test_cuda_graph_compile_modes_with_accumulation_are_refused(mode, capsys):
    """Item 7: CUDA graphs overwrite one micro-batch's gradients with the next's (pytorch/pytorch#169545)."""
    err = refusal(['--compile-mode', mode, '--accum_iter', 2], capsys)
    assert f'--compile-mode {mode}' in err and 'max-autotune-no-cudagraphs' in err
    main.check_args(parse(['--compile-mode', mode]))
    for other in ('default', 'max-autotune-no-cudagraphs'):
        main.check_args(parse(['--compile-mode', other, '--accum_iter', 2]))


# ---- 4, slow 1: the RoPE cache and DDP's buffers -------------------------------------------------------
def test_rope_cache_keeps_one_entry_per_grid_device_and_dtype():
    """Item 4: DDP's buffer broadcast (on some torch releases) and the EMA's lerp write the frequency
    buffers in place every step; the cache rebuilds its one entry instead of adding one per step."""
    model = tiny_vit5()
    ema = main.build_ema(parse(['--model-ema-decay', 0.5]), model)
    x = torch.randn(1, 3, 32, 32)
    first = model.cached_rope_tables(2, 2, torch.float32)
    for _ in range(10):
        with torch.no_grad():
            for b in model.buffers():
                b.copy_(b.clone())  # what a broadcast from rank 0 does
        model(x)
        ema.update(model)
        ema.module(x)
    assert len(model._rope_cache) == len(ema.module._rope_cache) == 1
    assert torch.equal(model.cached_rope_tables(2, 2, torch.float32)[0], first[0])
    model(torch.randn(1, 3, 32, 48))
    model.cached_rope_tables(2, 2, torch.bfloat16)
    assert {(r, c, d) for r, c, _, d in model._rope_cache} == {
        (2, 2, torch.bfloat16), (2, 2, torch.float32), (2, 3, torch.float32)}


def test_rope_buffers_are_the_only_buffers_and_ddp_does_not_broadcast_them(monkeypatch):
    """Slow 1: nothing the models hold as a buffer changes in training (only the RoPE frequencies are
    buffers), so main.wrap_ddp turns DDP's broadcast before every forward off."""
    for name in timm.list_models(module='models_vit5'):
        with torch.device('meta'):  # the layout only
            model = timm.create_model(name, depth=1, num_classes=3, img_size=32)
        assert all(k.endswith('.freqs') for k, _ in model.named_buffers()), name
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', world_size=1, rank=0)
    try:
        ddp = main.wrap_ddp(tiny_vit5(), parse([]), CPU)
        assert ddp.broadcast_buffers is False
    finally:
        dist.destroy_process_group()


TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2')


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason='needs gloo')
def test_two_process_ddp_keeps_the_rope_cache_bounded_and_evaluates_sharded(tmp_path):
    """Items 4, 8, slow 1, slow 3 under torchrun x2 (gloo): tests/ddp_paths_worker.py joins through
    utils.init_distributed, trains 12 steps through main.wrap_ddp with accumulation and the EMA, then
    evaluates with main.run_eval's default (every rank a shard)."""
    proc = run_cli([], launcher=TORCHRUN, script='tests/ddp_paths_worker.py', env={'RESULT_DIR': str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    for r in results:
        assert r['world_size'] == 2 and r['optimizer_steps'] == 6 and r['broadcast_buffers'] is False
        assert r['cache_entries'] == dict(model=1, ema=1) and r['buffer_versions_unchanged']
        assert r['eval_n'] == 2 * 3 * 2  # both ranks' shards, all-reduced
    assert results[0]['eval_acc1'] == results[1]['eval_acc1']


# ---- 5: inference_mode and the cache --------------------------------------------------------------
def test_training_after_an_inference_mode_forward_on_the_plain_ops():
    """Item 5: tables first built under torch.inference_mode() are ordinary tensors, so the plain rotation
    (CUDA's path; forced here with set_fast_paths(False)) can save them for the backward."""
    model = tiny_vit5()
    x = torch.randn(2, 3, 32, 32)
    models_vit5.set_fast_paths(False)
    try:
        with torch.inference_mode():
            model.eval()(x)
        model.train()(x).sum().backward()
    finally:
        models_vit5.set_fast_paths(True)
    assert model.blocks[0].attn.qkv.weight.grad is not None


# ---- 6: flash-attn in float32 ------------------------------------------------------------------------
def test_flash_attention_returns_the_inputs_dtype(monkeypatch):
    """Item 6: flash-attn computes in bf16 (a stand-in here, CUDA only); a float32 caller gets float32."""
    calls = install_flash_attn(monkeypatch)
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)  # (B, heads, N, hd)
    out = models_vit5.flash_attention(q, k, v, 0.0)
    assert out.dtype == torch.float32 and calls == [torch.bfloat16]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=3e-2, rtol=3e-2)


# ---- 8: the process group --------------------------------------------------------------------------
def test_process_group_is_bound_to_the_local_gpu_with_the_dist_timeout(monkeypatch):
    """Item 8: NCCL gets device_id = cuda:LOCAL_RANK (not RANK % GPUs), every backend the --dist-timeout
    (30 minutes unless given; PyTorch's 10 is too short for rank 0's checkpoint writes)."""
    calls = []
    monkeypatch.setattr(builtins, 'print', builtins.print)  # init_distributed mutes other ranks' print
    monkeypatch.setattr(dist, 'init_process_group', lambda *a, **kw: calls.append(('init', a, kw)))
    monkeypatch.setattr(dist, 'barrier', lambda *a, **kw: calls.append(('barrier', a, kw)))
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: calls.append(('set_device', d)))
    for k, v in dict(RANK='5', WORLD_SIZE='8', LOCAL_RANK='1', MASTER_ADDR='node0', MASTER_PORT='1234').items():
        monkeypatch.setenv(k, v)
    utils.init_distributed(parse(['--dist-timeout', 45]), 'cuda')
    (_, device), (_, args, kw), (_, _, barrier) = calls
    assert device == 1 and args == ('nccl',) and barrier == dict(device_ids=[1])
    assert kw['device_id'] == torch.device('cuda', 1) and kw['timeout'] == datetime.timedelta(minutes=45)
    calls.clear()
    utils.init_distributed(parse([]), 'cpu')
    (_, args, kw), _ = calls
    assert args == ('gloo',) and 'device_id' not in kw and kw['timeout'] == datetime.timedelta(minutes=30)
    assert parse([]).dist_timeout == utils.DIST_TIMEOUT_MINUTES > 10
    with pytest.raises(SystemExit):
        parse(['--dist-timeout', 0])


# ---- 9: TF32 and the augmentation --------------------------------------------------------------------
def test_augmentation_matmuls_run_in_full_float32_under_tf32():
    """Item 9: --tf32 sets float32 matmul precision 'high' process-wide; DeviceAugment's resize and blur
    matmuls run with 'highest' all the same, and leave the setting as they found it."""
    seen = []

    class Precision(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, '__name__', '') in ('matmul', '__matmul__', 'einsum', 'bmm'):
                seen.append(torch.get_float32_matmul_precision())
            return func(*args, **(kwargs or {}))

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, 50, 3), dtype=np.uint8)) for h in (40, 70, 90, 33, 64, 50)]
    torch.manual_seed(2)  # some crops blurred (the blur is a matmul too)
    rows, params, _ = gpu_augment.collate([(gpu_augment.ThreeAugmentDraw(32)(im), 0) for im in images])
    assert (params[:, gpu_augment.OP] == gpu_augment.BLUR).any()
    before = torch.get_float32_matmul_precision()
    main.apply_speed_settings(parse(['--tf32']))
    try:
        with Precision():
            gpu_augment.DeviceAugment(32)(rows, params)
        assert torch.get_float32_matmul_precision() == 'high'
    finally:
        torch.set_float32_matmul_precision(before)
    assert len(seen) >= 10 and set(seen) == {'highest'}


# ---- 10: cosub under bf16 autocast -------------------------------------------------------------------
def test_cosub_soft_targets_are_not_rounded_to_bf16():
    """Item 10: under bf16 autocast the model's logits are bf16; each half's soft target is the sigmoid of
    the other half's logits taken in float32, as without autocast."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 10, generator=g) * 3).bfloat16()
    targets = torch.randint(0, 10, (4,), generator=g)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = CosubLoss()(None, logits, targets)
    a, b = logits.float().chunk(2)
    t = F.one_hot(targets, 10).float()
    bce = F.binary_cross_entropy_with_logits
    expected = 0.25 * (bce(a, t) + bce(b, t) + bce(a, b.sigmoid()) + bce(b, a.sigmoid()))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


# ---- 11: one process on another GPU ----------------------------------------------------------------
def test_single_process_on_cuda_1_makes_it_the_current_gpu(monkeypatch):
    """Item 11: --device cuda:1 without a launcher sets the current CUDA device, so the DataLoader's
    pin-memory thread (and any other device-less CUDA call) opens no context on GPU 0."""
    current, ran = [], []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device', current.append)
    monkeypatch.setattr(main, 'run', lambda args, device, amp_dtype: ran.append(device) or {})
    for k in ('RANK', 'WORLD_SIZE', 'SLURM_PROCID', 'SLURM_NTASKS'):
        monkeypatch.delenv(k, raising=False)
    main.main(parse(['--device', 'cuda:1']))
    assert ran == [torch.device('cuda', 1)] and [torch.device(d) for d in current] == [torch.device('cuda', 1)]


# ---- slow 3: sharded evaluation by default under DDP ---------------------------------------------------
def test_dist_eval_is_the_default_under_ddp(tmp_path, monkeypatch):
    """Slow 3: every rank evaluates its own shard unless --no-dist-eval; the released commands' --dist-eval
    still parses."""
    assert parse([]).dist_eval and parse(['--dist-eval']).dist_eval and not parse(['--no-dist-eval']).dist_eval
    data = make_image_folder(tmp_path / 'data', train_per_class=(1, 1, 1), val_per_class=(3, 2, 2))
    monkeypatch.setattr(utils, 'get_world_size', lambda: 2)
    monkeypatch.setattr(utils, 'get_rank', lambda: 1)
    shards = []
    for flags in ([], ['--no-dist-eval']):
        args = parse(TINY + ['--data-path', data, '--eval', '--resume', 'x.pth'] + flags)
        args.distributed = True
        _, loader_val, n_val, _ = main.build_loaders(args, CPU)
        shards.append(len(loader_val.dataset))
    assert n_val == 7 and shards == [3, 7]  # rank 1 of 2: images 1, 3, 5; without: all, on rank 0 alone


# ---- slow 4: evaluation reads the device at progress lines only -----------------------------------
HOST_READS = ('item', 'tolist', 'cpu', 'numpy', '__array__', '__bool__', '__float__', '__int__', '__index__',
              '__complex__')


def test_evaluation_reads_the_device_only_on_progress_lines(monkeypatch):
    """Slow 4: 25 batches, progress lines at 0, 10, 20 and 24: one read at each, and one for the result."""
    model = nn.Linear(3, 4)
    current, reads = [None], []

    class Batches(list):
        def __iter__(self):
            for i, batch in enumerate(super().__iter__()):
                current[0] = i
                yield batch

    loader = Batches((torch.randn(2, 3), torch.randint(0, 4, (2,))) for _ in range(25))

    def counted(name, method):
        def wrapper(self, *args, **kwargs):
            reads.append(current[0] if current[0] is not None else name)
            return method(self, *args, **kwargs)
        return wrapper

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        stats = engine.evaluate(loader, model, CPU)
    assert Counter(reads) == {0: 1, 10: 1, 20: 1, 24: 2}, reads  # the last: its progress line and the result
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in loader])
    targets = torch.cat([y for _, y in loader])
    assert stats['n'] == 50 and stats['loss'] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert stats['acc1'] == pytest.approx(100 * (logits.argmax(-1) == targets).float().mean().item())


# ---- slow 5: the EMA on the CPU --------------------------------------------------------------------
def test_model_ema_force_cpu_help_says_what_it_costs():
    """Slow 5 (the one foreach copy itself: tests/test_fake_cuda.py)."""
    text = ' '.join(main.get_args_parser().format_help().split())
    assert 'waits for the device, copies all weights to the host' in text


def test_host_ema_on_the_models_device_is_timms_update():
    model = tiny_vit5()
    ours = main.build_ema(parse(['--model-ema-decay', 0.5, '--model-ema-force-cpu']), model)
    timms = timm.utils.ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ours.update(model)
    timms.update(model)
    for (k, a), b in zip(ours.module.state_dict().items(), timms.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_host_ema_update_equals_timms_per_tensor_update():
    """HostModelEma's cross-device path (the model on 'another device', here a second CPU model seen as
    such) gives timm's numbers: staging copy, then the same lerp."""
    model = tiny_vit5()
    ours = main.build_ema(parse(['--model-ema-decay', 0.75, '--model-ema-force-cpu']), model)
    timms = timm.utils.ModelEmaV3(model, decay=0.75, foreach=False)
    ours.crosses_devices = lambda values: True  # take the cross-device path between two CPU models
    staged = []
    real_copy = torch._foreach_copy_
    torch_copy = lambda dst, src, non_blocking=False: staged.append(len(src)) or real_copy(dst, src)  # noqa: E731
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        torch._foreach_copy_ = torch_copy
        try:
            ours.update(model)
        finally:
            torch._foreach_copy_ = real_copy
        timms.update(model)
    assert staged == [len(model.state_dict())] * 3
    for (k, a), b in zip(ours.module.state_dict().items(), timms.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
