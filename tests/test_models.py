"""The model family against the released facts (tests/data/checkpoint_layout.json and the spec).

`reference_forward` below is an independent, deliberately plain re-statement of the released
forward pass (explicit loops for RoPE, explicit softmax attention), written from the spec.
"""
import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import models_vit5
from models_vit5 import DEIT3_KWARGS, RMSNorm, VisionTransformer5, apply_rope, checkpoint_filter_fn

LAYOUT = json.loads((Path(__file__).parent / 'data' / 'checkpoint_layout.json').read_text())['models']
ALL_MODELS = ['vit5_tiny', 'vit5_small', 'vit5_base', 'vit5_large', 'vit5_xlarge',
              'deit_small_patch16_LS', 'deit_base_patch16_LS', 'deit_large_patch16_LS']
TINY = dict(embed_dim=64, depth=2, num_heads=2)  # head_dim 32: 8 frequencies per axis


def small_model(img_size=64, **kwargs) -> VisionTransformer5:
    torch.manual_seed(0)
    model = VisionTransformer5(img_size=img_size, num_classes=10, **{**TINY, **kwargs}).eval()
    # LayerScale starts at 1e-4, which would hide most of the blocks in any comparison
    with torch.no_grad():
        for blk in model.blocks:
            if blk.gamma_1 is not None:
                blk.gamma_1.normal_(0.5, 0.1)
                blk.gamma_2.normal_(0.5, 0.1)
    return model


# ---- an independent reference of the released forward --------------------------------------------
def ref_norm(x, sd, prefix, layer_norm):
    if layer_norm:
        return F.layer_norm(x, x.shape[-1:], sd[prefix + '.weight'], sd[prefix + '.bias'], 1e-6)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x)
    return y * sd[prefix + '.weight']


def ref_angles(positions, freqs):
    """positions: list of (row, col) floats -> (N, head_dim) angle per channel, pairs adjacent."""
    q = len(freqs)
    table = torch.zeros(len(positions), 4 * q, dtype=torch.float64)
    for t, (r, c) in enumerate(positions):
        for j in range(2 * q):  # pair j covers channels 2j, 2j+1
            ang = r * freqs[j] if j < q else c * freqs[j - q]
            table[t, 2 * j] = table[t, 2 * j + 1] = ang
    return table


def ref_rotate(x, angles):
    """x: (B, nh, N, hd); rotate each adjacent pair (a, b) by its angle."""
    out = x.clone()
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    for j in range(0, x.shape[-1], 2):
        a, b = x[..., j], x[..., j + 1]
        out[..., j] = a * cos[:, j] - b * sin[:, j]
        out[..., j + 1] = b * cos[:, j] + a * sin[:, j]
    return out


def ref_positions(n_rows, n_cols, grid):
    return [(r / n_rows * grid[0], c / n_cols * grid[1]) for r in range(n_rows) for c in range(n_cols)]


def reference_forward(sd, x, num_heads, grid, patch=16, num_registers=4, layer_norm=False, rope=True,
                      qk_norm=True):
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    tok = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=patch)
    B, D, h, w = tok.shape
    tok = tok.flatten(2).transpose(1, 2)  # row-major patches
    pos = sd['pos_embed']
    if (h, w) != tuple(grid):
        pos = pos.reshape(1, grid[0], grid[1], D).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode='bicubic', align_corners=False)
        pos = pos.permute(0, 2, 3, 1).reshape(1, h * w, D)
    tok = tok + pos
    parts = [sd['cls_token'].expand(B, -1, -1), tok]
    if num_registers:
        parts.append(sd['reg_token'].expand(B, -1, -1))
    x = torch.cat(parts, 1)
    N, hd = x.shape[1], D // num_heads
    angles = None
    if rope:
        side = math.isqrt(num_registers)
        pa = ref_angles(ref_positions(h, w, grid), sd['blocks.0.attn.rope.freqs'].tolist())
        ra = ref_angles([(k // side, k % side) for k in range(num_registers)],
                        sd['blocks.0.attn.rope_reg.freqs'].tolist())
        angles = torch.cat([torch.zeros(1, hd, dtype=torch.float64), pa, ra])  # cls not rotated
    for i in range(depth):
        p = f'blocks.{i}.'
        y = ref_norm(x, sd, p + 'norm1', layer_norm)
        qkv = y @ sd[p + 'attn.qkv.weight'].T
        if p + 'attn.qkv.bias' in sd:
            qkv = qkv + sd[p + 'attn.qkv.bias']
        q, k, v = qkv.reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        if qk_norm:
            q, k = ref_norm(q, sd, p + 'attn.q_norm', layer_norm), ref_norm(k, sd, p + 'attn.k_norm', layer_norm)
        if angles is not None:
            q, k = ref_rotate(q, angles), ref_rotate(k, angles)
        attn = (q @ k.transpose(-2, -1) * hd ** -0.5).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, D) @ sd[p + 'attn.proj.weight'].T + sd[p + 'attn.proj.bias']
        x = x + sd[p + 'gamma_1'] * y
        y = ref_norm(x, sd, p + 'norm2', layer_norm)
        y = F.gelu(y @ sd[p + 'mlp.fc1.weight'].T + sd[p + 'mlp.fc1.bias'])
        x = x + sd[p + 'gamma_2'] * (y @ sd[p + 'mlp.fc2.weight'].T + sd[p + 'mlp.fc2.bias'])
    x = ref_norm(x, sd, 'norm', layer_norm)
    return x[:, 0] @ sd['head.weight'].T + sd['head.bias']


# ---- layout and sizes -----------------------------------------------------------------------------
@pytest.mark.parametrize('entry', list(LAYOUT))
def test_state_dict_layout_and_param_count(entry):
    name, size = entry.split('@')
    with torch.device('meta'):
        model = timm.create_model(name, img_size=int(size))
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == LAYOUT[entry]['state_dict']
    assert sum(p.numel() for p in model.parameters()) == LAYOUT[entry]['params']
    buffers = {n for n, _ in model.named_buffers()}
    assert buffers == {k for k in sd if k.endswith('.freqs')}  # the RoPE buffers are persistent


def test_tiny_sizing():
    with torch.device('meta'):
        model = timm.create_model('vit5_tiny')
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (192, 12, 3)


def test_strict_load_of_layout_shaped_state_dict():
    g = torch.Generator().manual_seed(0)
    layout = LAYOUT['vit5_small@224']['state_dict']
    sd = {k: torch.randn(shape, generator=g) for k, shape in layout.items()}
    model = timm.create_model('vit5_small')
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize('name', ALL_MODELS)
def test_every_variant_trains_on_tiny_input(name):
    # full width, one block: every parameter kind of the variant, at CPU-test cost
    model = timm.create_model(name, depth=1, num_classes=3, img_size=32)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3)
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# ---- faithfulness against the reference ---------------------------------------------------------
def assert_matches_reference(model, x, **ref_kwargs):
    with torch.no_grad():
        out = model(x)
    ref = reference_forward(model.state_dict(), x, **ref_kwargs)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=0)


def test_matches_reference_vit5_at_build_size():
    model = small_model()
    assert_matches_reference(model, torch.randn(2, 3, 64, 64), num_heads=2, grid=(4, 4))


def test_matches_reference_vit5_small_full_size():
    model = timm.create_model('vit5_small').eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.gamma_1.fill_(0.3)
            blk.gamma_2.fill_(0.3)
    assert_matches_reference(model, torch.randn(1, 3, 224, 224), num_heads=6, grid=(14, 14))


def test_matches_reference_deit3():
    model = small_model(**DEIT3_KWARGS)
    assert_matches_reference(model, torch.randn(2, 3, 64, 64), num_heads=2, grid=(4, 4), num_registers=0,
                             layer_norm=True, rope=False, qk_norm=False)


@pytest.mark.parametrize('hw', [(96, 96), (32, 48), (80, 64)])
def test_other_and_rectangular_sizes_match_reference(hw):
    model = small_model()
    assert_matches_reference(model, torch.randn(1, 3, *hw), num_heads=2, grid=(4, 4))


def test_rectangular_build_size():
    model = small_model(img_size=(32, 64))
    assert model.grid == (2, 4) and model.pos_embed.shape[1] == 8
    assert_matches_reference(model, torch.randn(1, 3, 32, 64), num_heads=2, grid=(2, 4))


def test_build_size_untouched_by_other_sizes():
    model = small_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model(torch.randn(1, 3, 96, 48))
        assert torch.equal(model(x), before)


def test_size_not_divisible_by_patch_names_both_numbers():
    model = small_model()
    with pytest.raises(ValueError, match=r'60x64.*16'):
        model(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r'40x40.*16'):
        VisionTransformer5(img_size=40, **TINY)


# ---- RoPE facts ------------------------------------------------------------------------------------
def test_rope_frequencies_formula():
    attn = small_model().blocks[0].attn
    hd = attn.head_dim
    i = torch.arange(hd // 4, dtype=torch.float64)
    torch.testing.assert_close(attn.rope.freqs.double(), 10000 ** (-2 * i / (hd / 2)), rtol=1e-6, atol=0)
    torch.testing.assert_close(attn.rope_reg.freqs.double(), 100 ** (-2 * i / (hd / 2)), rtol=1e-6, atol=0)


def test_rope_angle_layout_rows_cols_pairs_and_build_positions():
    rope = small_model().blocks[0].attn.rope  # grid 4x4, head_dim 32
    ang = rope.angles(4, 4)
    f = rope.freqs
    assert ang.shape == (16, 32)
    assert torch.equal(ang[:, 0::2], ang[:, 1::2])  # each frequency on two adjacent channels
    for r in range(4):
        for c in range(4):
            row = ang[r * 4 + c]  # row-major patch index
            torch.testing.assert_close(row[:16:2], r * f)  # first half: row position
            torch.testing.assert_close(row[16::2], c * f)  # second half: column position


def test_rope_positions_scale_to_build_grid():
    rope = small_model().blocks[0].attn.rope
    f0 = rope.freqs[0]  # 1.0: the angle is the position itself
    ang = rope.angles(8, 2)  # 8 rows, 2 cols on a model built for 4x4
    rows = ang[::2, 0] / f0
    cols = ang[:2, 16] / f0
    torch.testing.assert_close(rows, torch.arange(8) / 8 * 4)
    torch.testing.assert_close(cols, torch.arange(2) / 2 * 4)


def test_rope_rotation_direction():
    ang = torch.tensor([[0.3, 0.3]])
    cos, sin = ang.cos(), ang.sin() * torch.tensor([-1., 1.])
    e0 = apply_rope(torch.tensor([[1., 0.]]), cos, sin)  # (a, b) -> (a cos - b sin, b cos + a sin)
    e1 = apply_rope(torch.tensor([[0., 1.]]), cos, sin)
    torch.testing.assert_close(e0, torch.tensor([[math.cos(.3), math.sin(.3)]]))
    torch.testing.assert_close(e1, torch.tensor([[-math.sin(.3), math.cos(.3)]]))


def test_rope_tables_in_token_order_cls_registers_patches():
    model = small_model()
    cos, sin = model.rope_tables(4, 4, torch.float32)
    assert cos.shape == (1 + 4 + 16, 32)
    assert torch.equal(cos[0], torch.ones(32)) and torch.equal(sin[0], torch.zeros(32))  # cls: not rotated
    angle = torch.atan2(sin[:, 1::2], cos[:, 1::2])  # one angle per channel pair; odd channels carry +sin
    f = model.blocks[0].attn.rope_reg.freqs
    registers = ref_angles([(k // 2, k % 2) for k in range(4)], f.tolist())[:, 1::2].float()  # 2x2 grid
    torch.testing.assert_close(angle[1:5], registers)
    patches = model.blocks[0].attn.rope.angles(4, 4)[:, 1::2]
    torch.testing.assert_close(angle[5:], torch.atan2(patches.sin(), patches.cos()))


def test_rope_leaves_class_token_query_unchanged():
    model = small_model()
    attn, x = model.blocks[0].attn, torch.randn(1, 21, 64)
    rope = model.rope_tables(4, 4, torch.float32)
    q_rot, k_rot, _ = attn.qkv_heads(x, rope)
    q_raw, k_raw, _ = attn.qkv_heads(x, None)
    assert torch.equal(q_rot[:, :, 0], q_raw[:, :, 0]) and torch.equal(k_rot[:, :, 0], k_raw[:, :, 0])
    assert not torch.allclose(q_rot[:, :, 2], q_raw[:, :, 2])


def test_rope_cache_reused_and_rebuilt_after_load():
    model = small_model()
    a = model.cached_rope_tables(4, 4, torch.float32)
    assert model.cached_rope_tables(4, 4, torch.float32) is a
    sd = model.state_dict()
    for k in sd:
        if k.endswith('rope.freqs'):
            sd[k] = sd[k] * 2
    model.load_state_dict(sd)
    b = model.cached_rope_tables(4, 4, torch.float32)
    assert b is not a and not torch.equal(a[0], b[0])


def test_registers_must_be_square():
    with pytest.raises(ValueError, match='perfect square'):
        VisionTransformer5(img_size=32, num_registers=3, **TINY)
    model = VisionTransformer5(img_size=32, num_registers=9, **TINY)
    assert model.reg_token.shape[1] == 9 and model.blocks[0].attn.rope_reg.grid == (3, 3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


# ---- norm and attention paths --------------------------------------------------------------------
def test_rmsnorm_casts_back_before_weight():
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    y = norm(x)
    expect = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm.weight
    assert y.dtype == torch.float32 and torch.equal(y, expect)


def test_sdpa_equals_explicit_softmax_attention():
    model = small_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        sdpa = model(x)
        model.set_attn_backend('eager')
        eager = model(x)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)
    # and attention_probs @ v reproduces one attention layer
    attn, tokens = model.blocks[0].attn, torch.randn(2, 21, 64)
    rope = model.rope_tables(4, 4, torch.float32)
    _, _, v = attn.qkv_heads(tokens, rope)
    manual = (attn.attention_probs(tokens, rope) @ v).transpose(1, 2).reshape(2, 21, 64)
    model.set_attn_backend('sdpa')
    torch.testing.assert_close(attn(tokens, rope), attn.proj(manual), atol=1e-5, rtol=1e-5)


def test_flash_backend_missing_is_a_clear_error():
    with pytest.raises(ValueError, match='attn_backend'):
        VisionTransformer5(img_size=32, attn_backend='xformers', **TINY)
    if importlib.util.find_spec('flash_attn') is not None:
        pytest.skip('flash-attn installed: nothing missing to report')
    with pytest.raises(ImportError, match='flash-attn'):
        VisionTransformer5(img_size=32, attn_backend='flash_attn', **TINY)


def test_attention_maps_are_distributions():
    model = small_model()
    maps, grid = model.get_attention_maps(torch.randn(2, 3, 64, 64), indices=[0, -1])
    assert grid == (4, 4) and sorted(maps) == [0, 1]
    assert maps[1].shape == (2, 2, 21, 21)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 2, 21))


# ---- backbone API ---------------------------------------------------------------------------------
def test_forward_split_and_intermediates():
    model = small_model()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1 + 4 + 24, 64) and model.num_prefix_tokens == 5  # cls, registers, patches
        torch.testing.assert_close(model.forward_head(feats), model(x))
        assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 0])
        final, inter = model.forward_intermediates(x, indices=[0, 1])
        torch.testing.assert_close(final, feats)
        assert [t.shape for t in inter] == [(2, 64, 6, 4)] * 2
        only = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(only[0].flatten(2).transpose(1, 2), feats[:, model.num_prefix_tokens:])
        (maps, prefix), = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True,
                                                      output_fmt='NLC', intermediates_only=True)
        assert maps.shape == (2, 24, 64) and prefix.shape == (2, 5, 64)


def test_grad_checkpointing_same_result():
    model = small_model().train()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_no_weight_decay_and_layer_decay_groups():
    model = small_model()
    assert model.no_weight_decay() == {'pos_embed', 'cls_token', 'reg_token'}
    from timm.optim import param_groups_layer_decay
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5,
                                      no_weight_decay_list=model.no_weight_decay())
    scales = sorted({g['lr_scale'] for g in groups})
    assert len(scales) == len(model.blocks) + 2  # stem, each block, head/norm
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    no_decay = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(model.pos_embed) in no_decay and id(model.blocks[0].attn.qkv.weight) not in no_decay


def test_no_graph_breaks_under_compile():
    model = small_model()
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ---- token layout (timm's): [cls] + [registers] + row-major patches -------------------------------
def test_token_layout_cls_registers_then_row_major_patches():
    model = small_model(img_size=(64, 48), depth=0)  # no blocks: the tokens as embedded, then normed
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        feats = model.forward_features(x)
        conv = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=16)  # (2, D, 4, 3)
        R = model.num_registers
        assert model.num_prefix_tokens == 1 + R == 5
        torch.testing.assert_close(feats[:, 0], model.norm(model.cls_token[0, 0]).expand(2, -1))
        torch.testing.assert_close(feats[:, 1:1 + R], model.norm(model.reg_token[0]).expand(2, -1, -1))
        for r in range(4):
            for c in range(3):
                patch = conv[:, :, r, c] + model.pos_embed[0, r * 3 + c]
                torch.testing.assert_close(feats[:, model.num_prefix_tokens + r * 3 + c], model.norm(patch))


# ---- one dispatcher for the evaluation paths ------------------------------------------------------
def test_eager_path_decision_table():
    from models_vit5 import eager_path
    assert eager_path('cpu', torch.float32, True) == 'cpu'  # CPU training: hand-written backward, complex RoPE
    assert eager_path('cpu', torch.float32, False) == ''  # CPU inference: the plain ops tracers also see
    assert eager_path('cpu', torch.bfloat16, True) == ''
    assert eager_path('cuda', torch.bfloat16, False) == eager_path('cuda', torch.float32, True) == 'cuda'
    assert eager_path('meta', torch.float32, True) == ''


def test_fast_path_runs_in_eager_cpu_training_only_and_obeys_the_switch():
    from models_vit5 import fast_path, rms_norm, set_fast_paths
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    assert fast_path(x) == 'cpu' and fast_path(x.detach()) == '' and fast_path(x.double()) == ''
    assert type(rms_norm(x, w, 1e-6).grad_fn).__name__ == '_RMSNormCPUBackward'
    cos, sin = torch.ones(8), torch.zeros(8)
    flatten_of = apply_rope(x, cos, sin).grad_fn.next_functions[0][0]
    assert type(flatten_of).__name__ == 'ViewAsRealBackward0'  # one complex multiply
    with torch.no_grad():
        assert fast_path(x) == ''
    set_fast_paths(False)
    try:
        assert fast_path(x) == ''
        assert type(rms_norm(x, w, 1e-6).grad_fn).__name__ == 'MulBackward0'  # the formula's last op
        assert type(apply_rope(x, cos, sin).grad_fn).__name__ == 'AddcmulBackward0'
    finally:
        set_fast_paths(True)


def test_fast_and_plain_paths_train_alike():
    from models_vit5 import set_fast_paths
    model = small_model().train()
    x = torch.randn(2, 3, 64, 48)
    runs = []
    for fast in (True, False):
        set_fast_paths(fast)
        try:
            model.zero_grad()
            out = model(x)
            out.square().sum().backward()
        finally:
            set_fast_paths(True)
        runs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_fast, grads_fast), (out_plain, grads_plain) = runs
    torch.testing.assert_close(out_fast, out_plain, atol=1e-5, rtol=1e-5)
    for g_fast, g_plain in zip(grads_fast, grads_plain):
        torch.testing.assert_close(g_fast, g_plain, atol=1e-5, rtol=1e-4)


def test_attention_runs_in_the_autocast_dtype(monkeypatch):
    # the norm's float32 weight would leave q and k in float32 under autocast; they must join v
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', recording_sdpa)
    model = small_model(img_size=32).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 32, 32))
    out.float().sum().backward()
    assert seen == [(torch.bfloat16,) * 3] * len(model.blocks)
    with torch.no_grad():
        seen.clear()
        model(torch.randn(1, 3, 32, 32))  # float32 stays float32
    assert seen == [(torch.float32,) * 3] * len(model.blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_rms_norm_is_fused_and_within_bf16_rounding():
    from models_vit5 import fast_path, rms_norm
    x = torch.randn(4, 16, 64, device='cuda')
    w = torch.rand(64, device='cuda') + 0.5
    assert fast_path(x) == 'cuda'
    xf = x.float()
    formula = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    with torch.autocast('cuda', dtype=torch.bfloat16):
        y = rms_norm(x.bfloat16(), w, 1e-6)
    torch.testing.assert_close(y.float(), formula, atol=0.05, rtol=0.02)


# ---- timm's ViT contract --------------------------------------------------------------------------
def test_head_hidden_size_reset_classifier_and_global_pool():
    model = small_model()
    x = torch.randn(2, 3, 64, 64)
    prefix = model.num_prefix_tokens
    assert model.head_hidden_size == model.num_features == 64
    with torch.no_grad():
        feats = model.forward_features(x)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), feats[:, 0])  # no head: the pooled class token
        model.reset_classifier(3, 'avg')
        assert model.head.out_features == 3 and model.global_pool == 'avg'
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, prefix:].mean(1))
        model.reset_classifier(0, 'max')
        torch.testing.assert_close(model(x), feats[:, prefix:].amax(1))
        model.reset_classifier(0, '')
        torch.testing.assert_close(model(x), feats)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(0, 'map')
    built = timm.create_model('vit5_tiny', depth=1, global_pool='avg', num_classes=0)
    assert built.global_pool == 'avg' and built(torch.randn(1, 3, 32, 32)).shape == (1, 192)


def test_dynamic_img_size_off_takes_only_the_build_size():
    model = small_model(dynamic_img_size=False)
    model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r'96x64 differs.*\(64x64\)'):
        model(torch.randn(1, 3, 96, 64))


def test_set_input_size_equals_a_build_at_that_size():
    model = small_model()
    built = small_model(img_size=(96, 64))
    built.load_state_dict(checkpoint_filter_fn(model.state_dict(), built), strict=True)
    model.set_input_size(img_size=(96, 64))
    assert model.grid == (6, 4) and model.pos_embed.shape[1] == 24
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), built(x))
    with pytest.raises(ValueError, match='not divisible'):
        model.set_input_size(img_size=100)


def test_prune_intermediate_layers_keeps_what_the_features_need():
    model = small_model(depth=4)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 2]) == [0, 2]
        assert len(model.blocks) == 3 and isinstance(model.head, nn.Identity)
        after = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b)


# ---- checkpoints and the timm registry ----------------------------------------------------------
def test_checkpoint_filter_fn_224_into_384():
    src = timm.create_model('vit5_small', depth=1)
    ckpt = {'model': {'module.' + k: v for k, v in src.state_dict().items()}, 'epoch': 3}
    dst = timm.create_model('vit5_small', depth=1, img_size=384)
    sd = checkpoint_filter_fn(ckpt, dst)
    dst.load_state_dict(sd, strict=True)
    pos = src.pos_embed.detach().reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expect = F.interpolate(pos, size=(24, 24), mode='bicubic', align_corners=False)
    torch.testing.assert_close(dst.pos_embed.detach(), expect.permute(0, 2, 3, 1).reshape(1, 576, -1))
    assert torch.equal(dst.blocks[0].attn.rope.freqs, src.blocks[0].attn.rope.freqs)


def test_checkpoint_filter_fn_picks_ema_and_strips_compile_prefix():
    model = small_model()
    sd = model.state_dict()
    ema = {'_orig_mod.' + k: v + 1 for k, v in sd.items()}
    out = checkpoint_filter_fn({'model': sd, 'model_ema': ema}, model, use_ema=True)
    assert torch.equal(out['cls_token'], sd['cls_token'] + 1)
    out = checkpoint_filter_fn({'model': sd, 'model_ema': ema}, model)
    assert torch.equal(out['cls_token'], sd['cls_token'])
    no_freqs = {k: v for k, v in sd.items() if not k.endswith('freqs')}
    model.load_state_dict(checkpoint_filter_fn({'state_dict': no_freqs}, model), strict=True)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_timm_create_model_every_name_with_overrides(name):
    model = timm.create_model(name, num_classes=7, img_size=48, drop_path_rate=0.1, depth=2, embed_dim=64,
                              num_heads=2)
    assert isinstance(model, VisionTransformer5)
    assert len(model.blocks) == 2 and model.head.out_features == 7 and model.grid == (3, 3)
    assert model.blocks[1].drop_path.drop_prob == 0.1  # same rate in every block
    assert model.blocks[0].drop_path.drop_prob == 0.1
    assert model.pretrained_cfg['input_size'] == (3, 224, 224) or '384' in model.pretrained_cfg['tag']


def test_pretrained_cfg_and_local_file_loading(tmp_path):
    src = timm.create_model('vit5_small', depth=2).eval()
    assert src.pretrained_cfg['hf_hub_filename'] == 'vit5_small_patch16_224.pth' and not src.pretrained_cfg.get('file')
    model = timm.create_model('vit5_base.in1k_384', pretrained=False, depth=1)
    cfg = model.pretrained_cfg
    assert cfg['hf_hub_filename'] == 'vit5_base_patch16_384.pth' and cfg['input_size'] == (3, 384, 384)
    assert model.grid == (24, 24)  # the tag's size is the default build size
    path = tmp_path / 'vit5_small_patch16_224.pth'
    torch.save({'model': src.state_dict(), 'args': argparse.Namespace(model='vit5_small'), 'epoch': 799}, path)
    loaded = timm.create_model('vit5_small', depth=2, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x))


# ---- ablation switches -----------------------------------------------------------------------------
def ablation(**kwargs) -> VisionTransformer5:
    return VisionTransformer5(img_size=32, num_classes=5, **TINY, **kwargs)


def test_ablation_switches_change_their_module():
    base = ablation()
    assert isinstance(base.norm, RMSNorm) and isinstance(ablation(norm_layer='layer').blocks[0].norm1, nn.LayerNorm)
    assert base.blocks[0].gamma_1 is not None and ablation(init_values=None).blocks[0].gamma_1 is None
    assert ablation(init_values=0.1).blocks[0].gamma_2.detach().eq(0.1).all()
    assert isinstance(base.blocks[0].attn.q_norm, RMSNorm)
    assert isinstance(ablation(qk_norm=False).blocks[0].attn.k_norm, nn.Identity)
    assert ablation(rope=False).blocks[0].attn.rope is None
    assert ablation(reg_rope=False).blocks[0].attn.rope_reg is None
    torch.testing.assert_close(ablation(reg_rope_theta=50.).blocks[0].attn.rope_reg.freqs[1],
                               torch.tensor(50. ** (-2 / 16)))
    torch.testing.assert_close(ablation(rope_theta=1000.).blocks[0].attn.rope.freqs[1],
                               torch.tensor(1000. ** (-2 / 16)))
    no_reg = ablation(num_registers=0)
    assert no_reg.reg_token is None and no_reg.blocks[0].attn.rope_reg is None
    assert ablation(abs_pos_embed=False).pos_embed is None
    assert base.blocks[0].attn.qkv.bias is None and ablation(qkv_bias=True).blocks[0].attn.qkv.bias is not None
    assert isinstance(ablation(mlp_type='swiglu').blocks[0].mlp, timm.layers.SwiGLU)
    for kwargs in [dict(norm_layer='batch'), dict(mlp_type='relu')]:
        with pytest.raises(ValueError):
            ablation(**kwargs)


def per_block(*names) -> set:
    return {f'blocks.{i}.{name}' for i in range(TINY['depth']) for name in names}


# each switch: the state-dict entries (parameters and RoPE frequency buffers) it removes and adds
ABLATIONS = {
    'no LayerScale': (dict(init_values=None), per_block('gamma_1', 'gamma_2'), set()),
    'no abs pos_embed': (dict(abs_pos_embed=False), {'pos_embed'}, set()),
    'SwiGLU': (dict(mlp_type='swiglu'), per_block('mlp.fc1.weight', 'mlp.fc1.bias'),
               per_block('mlp.fc1_g.weight', 'mlp.fc1_g.bias', 'mlp.fc1_x.weight', 'mlp.fc1_x.bias')),
    'no RoPE': (dict(rope=False), per_block('attn.rope.freqs'), set()),
    'no register RoPE': (dict(reg_rope=False), per_block('attn.rope_reg.freqs'), set()),
    'no registers': (dict(num_registers=0), {'reg_token'} | per_block('attn.rope_reg.freqs'), set()),
    'no QK-norm': (dict(qk_norm=False), per_block('attn.q_norm.weight', 'attn.k_norm.weight'), set()),
    'LayerNorm': (dict(norm_layer='layer'), set(),
                  {'norm.bias'} | per_block('norm1.bias', 'norm2.bias', 'attn.q_norm.bias', 'attn.k_norm.bias')),
    'qkv bias': (dict(qkv_bias=True), set(), per_block('attn.qkv.bias')),
    'RoPE theta': (dict(rope_theta=100.), set(), set()),
    'register RoPE theta': (dict(reg_rope_theta=10.), set(), set()),
}


def random_weights(*models):
    """The same random values in every parameter the models share, by name and shape (LayerScale and norms
    included, so every block and every norm counts); the RoPE frequency buffers keep what each model computed."""
    g = torch.Generator().manual_seed(0)
    values = {}
    for model in models:
        for name, p in model.named_parameters():
            key = name, tuple(p.shape)
            if key not in values:
                values[key] = torch.randn(p.shape, generator=g) * 0.3
            with torch.no_grad():
                p.copy_(values[key])


@pytest.mark.parametrize('switch', list(ABLATIONS))
def test_each_ablation_switch_changes_its_tensors_and_the_output(switch):
    kwargs, removed, added = ABLATIONS[switch]
    base, model = ablation().eval(), ablation(**kwargs).eval()
    base_keys, keys = set(base.state_dict()), set(model.state_dict())
    assert (base_keys - keys, keys - base_keys) == (removed, added)
    assert {name for name, _ in model.named_buffers()} == {k for k in keys if k.endswith('.freqs')}
    if 'theta' in switch:  # same tensors, other frequencies
        name = 'rope_reg' if 'register' in switch else 'rope'
        assert not torch.equal(getattr(base.blocks[0].attn, name).freqs, getattr(model.blocks[0].attn, name).freqs)
    random_weights(base, model)
    x = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, out = base(x), model(x)
    assert (out - expected).abs().max() > 1e-4 * expected.abs().max(), switch  # float32 noise: 1e-7
    model.train()
    model(x).sum().backward()  # and it trains
    assert all(p.grad is not None for p in model.parameters())


def test_deit3_baseline_equals_timms_deit3_small():
    """deit_small_patch16_LS (this code with DEIT3_KWARGS) against timm's own deit3_small_patch16_224, an
    independent implementation: timm's randomly initialised weights (LayerScale and norms randomised so every
    block counts), mapped across by name (timm's ls1.gamma / ls2.gamma are our gamma_1 / gamma_2), give the
    same tokens and logits up to float32 rounding (8e-7 apart at full depth)."""
    torch.manual_seed(0)
    reference = timm.create_model('deit3_small_patch16_224', pretrained=False, depth=3).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith('.gamma') or 'norm' in name:
                p.add_(torch.randn_like(p) * 0.5)
    ours = timm.create_model('deit_small_patch16_LS', depth=3).eval()
    ours.load_state_dict({k.replace('.ls1.gamma', '.gamma_1').replace('.ls2.gamma', '.gamma_2'): v
                          for k, v in reference.state_dict().items()}, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), reference.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    assert set(ours.state_dict()) == {k for k in LAYOUT['deit_small_patch16_LS@224']['state_dict']
                                      if not k.startswith('blocks.') or k.startswith(('blocks.0.', 'blocks.1.',
                                                                                       'blocks.2.'))}


# the released files (SPEC.md): tag -> parameters
RELEASED_PARAMS = {'vit5_small.in1k': 22_039_144, 'vit5_base.in1k': 86_543_080, 'vit5_base.in1k_384': 86_834_920,
                   'vit5_large.in1k': 304_258_024, 'vit5_large.in1k_384': 304_647_144}


def test_every_released_tag_has_its_layout_entry():
    """Each released file's model and size is in the layout file (tested above key by key), with the
    released parameter count."""
    assert sorted(timm.list_pretrained('vit5*')) == sorted(RELEASED_PARAMS)
    for tag, params in RELEASED_PARAMS.items():
        cfg = models_vit5.released_cfg(tag)
        assert LAYOUT[f"{cfg['architecture']}@{cfg['input_size'][-1]}"]['params'] == params, tag


def test_cpu_rmsnorm_gradients_match_float64_formula():
    from models_vit5 import rms_norm
    for shape, wshape in [((2, 5, 8), (8,)), ((2, 3, 2, 4, 8), (2, 1, 8))]:
        x = torch.randn(shape, requires_grad=True)
        w = (torch.rand(wshape) + 0.5).requires_grad_()
        g = torch.randn(shape)
        torch.autograd.backward(rms_norm(x, w, 1e-6), g)
        xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
        torch.autograd.backward(ref, g.double())
        torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-5, atol=1e-6)
