"""main.py's speed settings: --compile-mode, fused optimizers, TF32, the DDP options, the EMA and LAMB
update paths. Kept apart from test_main.py (the run end to end) so each stays one subject."""
import builtins
import math

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import main
import models_vit5  # noqa: F401  (registers vit5_*)
from tinyrun import TINY, make_image_folder, parse, run_main
from utils import ConfigError


def tiny_vit5():
    torch.manual_seed(0)
    return timm.create_model('vit5_tiny', depth=2, embed_dim=48, num_heads=2, img_size=32, num_classes=5)


def set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2


# ---- --compile-mode ------------------------------------------------------------------------------
def test_compile_mode_reaches_torch_compile_and_trains(tmp_path, monkeypatch):
    """The one real compile of the suite (Inductor, mode 'default', a 2-block model: ~25 s cold)."""
    seen, real_compile = [], torch.compile

    def recording_compile(model, **kwargs):
        seen.append((type(model).__name__, kwargs))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, 'compile', recording_compile)
    data = make_image_folder(tmp_path / 'data')
    argv = TINY + ['--data-path', data, '--epochs', 1, '--no-repeated-aug', '--no-model-ema']
    stats, out = run_main(argv + ['--compile-mode', 'default'])
    assert seen == [('VisionTransformer5', {'mode': 'default'})]
    assert math.isfinite(stats['train_loss']) and 'Epoch: [0] [0/1]' in out


def test_plain_compile_flag_keeps_the_default_mode(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: seen.append(kw) or model)  # no compiling here
    data = make_image_folder(tmp_path / 'data')
    run_main(TINY + ['--data-path', data, '--epochs', 1, '--no-repeated-aug', '--no-model-ema', '--compile'])
    run_main(TINY + ['--data-path', data, '--epochs', 1, '--no-repeated-aug', '--no-model-ema'])
    assert seen == [{'mode': 'default'}]
    assert parse(['--compile-mode', 'max-autotune']).compile_mode == 'max-autotune'
    with pytest.raises(SystemExit):
        parse(['--compile-mode', 'fastest'])


# ---- optimizers ----------------------------------------------------------------------------------
def test_opt_fused_gives_torchs_fused_adamw_with_the_same_numbers():
    models = [tiny_vit5(), tiny_vit5()]
    opts = [main.build_optimizer(parse(['--opt', 'adamw', *extra]), m, torch.device('cpu'))
            for m, extra in zip(models, ([], ['--opt-fused']))]
    assert not opts[0].defaults['fused'] and opts[1].defaults['fused']
    for step in range(3):
        for m, opt in zip(models, opts):
            set_grads(m, step)
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_opt_fused_refuses_optimizers_without_a_fused_kernel():
    with pytest.raises(ConfigError, match='--opt-fused.*not lamb'):
        main.build_optimizer(parse(['--opt', 'lamb', '--opt-fused']), nn.Linear(2, 2), torch.device('cpu'))


def test_main_lamb_leaves_the_multi_tensor_choice_to_timm_and_both_paths_agree():
    """--opt fusedlamb without apex: main.build_optimizer gives timm's LAMB with the recipe's settings (lr,
    eps, no weight decay on biases, norms, embeddings and tokens) and leaves `foreach` to timm (None: the
    multi-tensor path on CUDA, the per-tensor loop on the CPU). Both paths, forced here on the CPU in the
    optimizers main.py built, give the same weights after several steps."""
    args = parse(['--opt', 'fusedlamb', '--lr', 4e-3, '--weight-decay', 0.05])
    models = [tiny_vit5(), tiny_vit5()]
    start = [p.detach().clone() for p in models[0].parameters()]
    opts = [main.build_optimizer(args, m, torch.device('cpu')) for m in models]
    assert all(type(opt) is timm.optim.Lamb for opt in opts)
    assert opts[0].defaults['lr'] == 4e-3 and opts[0].defaults['eps'] == 1e-8
    assert [g['foreach'] for g in opts[0].param_groups] == [None, None]
    names = {id(p): n for n, p in models[0].named_parameters()}
    no_decay = {names[id(p)] for g in opts[0].param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert {'pos_embed', 'cls_token', 'reg_token', 'norm.weight', 'head.bias', 'blocks.0.gamma_1'} <= no_decay
    assert not {'head.weight', 'blocks.0.attn.qkv.weight'} & no_decay
    for opt, foreach in zip(opts, (False, True)):
        for group in opt.param_groups:
            group['foreach'] = foreach
    for step in range(4):
        for m, opt in zip(models, opts):
            set_grads(m, step)
            opt.step()
    for (name, a), b, s in zip(models[0].named_parameters(), models[1].parameters(), start):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
        assert not torch.equal(a, s), name  # every tensor took the steps


# ---- EMA -----------------------------------------------------------------------------------------
def test_ema_foreach_update_follows_the_formula():
    model = tiny_vit5()
    ema = main.build_ema(parse(['--model-ema-decay', 0.75]), model)
    assert ema.foreach and main.build_ema(parse(['--no-model-ema']), model) is None
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        expected = {k: 0.75 * e + 0.25 * model.state_dict()[k] for k, e in expected.items()}
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6, msg=k)


# ---- TF32 and DDP --------------------------------------------------------------------------------
def test_tf32_flag_sets_float32_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision('highest')
        main.apply_speed_settings(parse([]))
        assert torch.get_float32_matmul_precision() == 'highest'  # PyTorch's default stays
        main.apply_speed_settings(parse(['--tf32']))
        assert torch.get_float32_matmul_precision() == 'high'
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.fixture
def one_process_group(monkeypatch):
    # port 0: the group's store binds a free port itself and keeps it (a group of one has no one to tell)
    dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', world_size=1, rank=0)
    monkeypatch.setattr(builtins, 'print', builtins.print)
    yield
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason='needs gloo')
@pytest.mark.parametrize('flags', [[], ['--ddp-bucket-view', '--ddp-static-graph']])
def test_ddp_options_reach_ddp_and_train(one_process_group, flags):
    model = tiny_vit5()
    ddp = main.wrap_ddp(model, parse(flags), torch.device('cpu'))
    assert (ddp.gradient_as_bucket_view, bool(ddp.static_graph)) == (bool(flags),) * 2
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(2):  # static_graph records the first iteration and checks the second
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
