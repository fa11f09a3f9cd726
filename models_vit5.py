"""ViT-5: the plain ViT with modernised parts.

patch embed -> (+ abs pos embed) -> [cls] + [registers] + patches
            -> L x Block(RMSNorm -> attention with QK-norm + 2D RoPE -> LayerScale,
                         RMSNorm -> GELU MLP -> LayerScale)
            -> RMSNorm -> head(cls)

Token layout (timm's), N = 1 + R + h*w:
    0              class token, not rotated
    1 .. R         registers, on a sqrt(R) x sqrt(R) grid with their own high-frequency RoPE
    1 + R ..       patches, row-major (index = row * w + col), 2D RoPE; pos_embed covers these only
so `num_prefix_tokens = 1 + R` and `forward_features(x)[:, model.num_prefix_tokens:]` are the patches.
The released checkpoints put the registers after the patches. Attention does not depend on the
order of the tokens (each carries its own RoPE angles and pos_embed is added per patch before the
join), so the same weights give the same logits up to float rounding; the state dict is unchanged.

The parameter and buffer names equal those of the released checkpoints
(`tests/data/checkpoint_layout.json`), so released files load strictly.
Every component the paper ablates is one constructor argument; with
`DEIT3_KWARGS` the same class is the DeiT-III (LayerScale) baseline.

`import models_vit5` registers every variant with timm:
    model = timm.create_model('vit5_base', num_classes=100, img_size=192)
    model = timm.create_model('vit5_base', pretrained=True)            # released weights, Hugging Face Hub
    backbone = timm.create_model('vit5_base', features_only=True, out_indices=(3, 7, 11))
"""
import math
import os
from typing import Final, List, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (DropPath, Mlp, PatchEmbed, SwiGLU, global_pool_nlc, resample_abs_pos_embed, to_2tuple,
                         trunc_normal_)
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._features import feature_take_indices

__all__ = ['VisionTransformer5', 'checkpoint_filter_fn', 'DEIT3_KWARGS', 'set_fast_paths', 'fast_path',
           'pretrained_file', 'released_cfg', 'HF_HUB_ID']


# ---- which evaluation runs: the one place that decides -------------------------------------------
_FAST_PATHS = True


def set_fast_paths(enable: bool) -> None:
    """Allow (default) or forbid the eager fast paths process-wide; off, eager runs the plain ops that
    tracers and exporters see (to check a result does not depend on them, or to time the plain ops)."""
    global _FAST_PATHS
    _FAST_PATHS = bool(enable)


def is_traced(x: torch.Tensor) -> bool:
    """True while TorchScript compiles, torch.jit.trace (and the legacy ONNX exporter) records, FX
    traces (x is a Proxy) or dynamo compiles (torch.compile, torch.export, the dynamo ONNX exporter).

    These all get the plain ops, no branch on the input size and no table cache.
    """
    if torch.jit.is_scripting():
        return True
    # the FX test comes before anything reads x.dtype / x.device: on a Proxy those are Proxies too
    # torch.compiler.is_compiling() is set by torch.export too, strict or not
    return torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling()


def fast_path(x: torch.Tensor) -> str:
    """How RMSNorm and RoPE are evaluated on `x`: the ONE place that decides (cf. timm's layers/config.py).

    ''      the plain ops, the formulas as written: always under a tracer, scripter, exporter or
            compiler (see is_traced), after set_fast_paths(False), and in CPU inference (so a traced
            graph reproduces eager inference bit for bit).
    'cpu'   eager CPU float32 with autograd recording: RMSNorm with a hand-written backward and RoPE
            as one complex multiply; both pay off in the backward pass of CPU training.
    'cuda'  eager CUDA: RMSNorm as one fused kernel (F.rms_norm) where its weight is a vector.
    Every path evaluates the same formula; they differ only in float rounding.
    """
    if torch.jit.is_scripting():
        return ''
    if not _FAST_PATHS or is_traced(x):
        return ''
    return eager_path(x.device.type, x.dtype, torch.is_grad_enabled() and x.requires_grad)


def eager_path(device_type: str, dtype: torch.dtype, records_grad: bool) -> str:
    """fast_path's choice for an eager tensor, from its device type, dtype and whether autograd records it."""
    if device_type == 'cuda':
        return 'cuda'
    if device_type == 'cpu' and dtype == torch.float32 and records_grad:
        return 'cpu'
    return ''


# ---- RMSNorm --------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm as released: normalise in float32, cast back, THEN scale by `weight`.

    Scaling after the cast means a bf16 input times a float32 weight comes out
    float32, exactly as in the released definition.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f'{self.dim}, eps={self.eps}'


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; `weight` broadcasts against x, e.g. (D,), or (2, 1, hd) for stacked q, k."""
    path = fast_path(x)
    if path == 'cpu' and weight.dtype == torch.float32:
        return _rms_norm_cpu(x, weight, eps)
    if path == 'cuda':
        if weight.dim() == 1:  # one fused kernel; scaling inside it differs from "cast, then scale" by bf16 rounding
            return F.rms_norm(x, x.shape[-1:], weight.to(x.dtype), eps)
        return F.rms_norm(x, x.shape[-1:], None, eps) * weight  # fused normalise (float32 inside, cast back)
    # the formula: plain ops every exporter knows (the legacy ONNX exporter has no aten::rms_norm)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


@torch.jit.unused
def _rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNormCPU.apply(x, weight, eps)


class _RMSNormCPU(torch.autograd.Function):
    """float32 RMSNorm with a hand-written backward, for CPU training (fast_path 'cpu').

    CPU has no fused RMSNorm kernel: F.rms_norm runs as pow, mean, rsqrt, mul, mul, and autograd
    adds ~9 full-size ops behind it. This does 3 full-size ops forward and 6-7 backward; on a busy
    CPU each parallel op also waits for scheduler time, so the op count matters as much as the bytes.
    Same maths as the formula in rms_norm (float32 throughout, so "normalise, cast back, scale" holds).
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        D = x.shape[-1]
        # rstd = 1 / sqrt(mean(x^2) + eps); vector_norm reads x once without a temporary
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(D).add_(eps).rsqrt_()
        # x may be a strided view (q, k inside the qkv output); a contiguous x_hat keeps every
        # backward op, above all the weight-gradient reduction, on contiguous memory
        x_hat = torch.mul(x, rstd, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad):
        # y = w * x_hat, x_hat = x * rstd  =>  dx = rstd * (g - x_hat * mean(g * x_hat)), g = grad * w
        x_hat, rstd, weight = ctx.saved_tensors
        p = grad * x_hat
        # sum over the dims the weight is broadcast along: the leading ones first, as one fast
        # column sum over contiguous rows, then any inner broadcast dims of the small rest
        lead = p.dim() - weight.dim()
        grad_weight = p.flatten(0, lead - 1).sum(0).sum_to_size(weight.shape) if lead else p.sum_to_size(weight.shape)
        # sum(g * x_hat) over the last dim, one matrix-vector product when the weight is a vector
        dot = p @ weight if weight.dim() == 1 else p.mul_(weight).sum(-1)
        mean_gx = dot.unsqueeze(-1).div_(x_hat.shape[-1])
        grad_x = (grad * weight).addcmul_(x_hat, mean_gx, value=-1).mul_(rstd)
        return grad_x, grad_weight, None


def make_norm(norm_layer: str, dim: int) -> nn.Module:
    if norm_layer == 'rms':
        return RMSNorm(dim, eps=1e-6)
    if norm_layer == 'layer':
        return nn.LayerNorm(dim, eps=1e-6)
    raise ValueError(f"norm_layer must be 'rms' or 'layer', got {norm_layer!r}")


# ---- rotary position embedding --------------------------------------------------------------------
def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """freqs[i] = theta ** (-2i / (head_dim / 2)), i < head_dim / 4 (one quarter per axis half)."""
    if head_dim % 4:
        raise ValueError(f'2D RoPE needs head_dim divisible by 4, got {head_dim}')
    quarter = head_dim // 4
    return theta ** (-torch.arange(quarter, dtype=torch.float32) * 2 / (head_dim // 2))


def rope_angles(freqs: torch.Tensor, n_rows: int, n_cols: int, grid: Tuple[int, int]) -> torch.Tensor:
    """(n_rows * n_cols, head_dim) angles of a 2D RoPE, positions row-major (index = row * n_cols + col).

    Channel layout of one head (head_dim = 4Q, freqs f0..f{Q-1}):
        channels [0, 2Q):  row angle    r*f0 r*f0 r*f1 r*f1 ... r*f{Q-1} r*f{Q-1}
        channels [2Q, 4Q): column angle c*f0 c*f0 ...             c*f{Q-1} c*f{Q-1}
    Each frequency covers two ADJACENT channels, rotated together (see `apply_rope`). Positions
    are scaled to the build grid: row r of n rows sits at r / n * grid[0], so a grid of the build
    size has positions 0 .. G-1 and other sizes span the same range.
    """
    rows = torch.arange(n_rows, device=freqs.device, dtype=torch.float32) / n_rows * grid[0]
    cols = torch.arange(n_cols, device=freqs.device, dtype=torch.float32) / n_cols * grid[1]
    freqs = freqs.float().repeat_interleave(2)  # [f0 f0 f1 f1 ...]
    row_ang = torch.outer(rows, freqs)  # (n_rows, 2Q)
    col_ang = torch.outer(cols, freqs)  # (n_cols, 2Q)
    ang = torch.cat([
        row_ang[:, None, :].expand(n_rows, n_cols, -1),
        col_ang[None, :, :].expand(n_rows, n_cols, -1),
    ], dim=-1)
    return ang.reshape(n_rows * n_cols, -1)


class RotaryEmbedding2D(nn.Module):
    """The frequencies of a 2D rotary embedding built for an (n_rows, n_cols) grid; see `rope_angles`.

    `freqs` is a persistent buffer because the released checkpoints carry it. It is a constant:
    nothing changes it during training (no optimizer sees it, and the EMA's lerp of equal values
    leaves it as it is). These are the only buffers of the model, which is why main.wrap_ddp tells
    DDP not to broadcast the buffers before every forward.
    """

    def __init__(self, head_dim: int, grid: Tuple[int, int], theta: float = 10000.):
        super().__init__()
        self.grid = tuple(grid)
        self.register_buffer('freqs', rope_frequencies(head_dim, theta), persistent=True)

    def angles(self, n_rows: int, n_cols: int) -> torch.Tensor:
        return rope_angles(self.freqs, n_rows, n_cols, self.grid)


@torch.fx.wrap  # one FX node, evaluated with real sizes (torch.arange of a traced size is not traceable)
def rope_tables(
        patch_freqs: Optional[torch.Tensor],
        reg_freqs: Optional[torch.Tensor],
        n_rows: int,
        n_cols: int,
        build_grid: Tuple[int, int],
        reg_side: int,
        dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (1 + R + n_rows*n_cols, head_dim), rows in token order: cls, registers, patches.

    The class token (and any part without RoPE) gets cos 1 / sin 0: not rotated. The R = reg_side^2
    registers sit on a reg_side x reg_side grid with their own frequencies. `sin` comes pre-signed per channel pair,
    [-s0 +s0 -s1 +s1 ...] (see apply_rope).
    """
    ref = patch_freqs if patch_freqs is not None else reg_freqs
    assert ref is not None, 'rope_tables needs patch or register frequencies'
    hd = 4 * ref.shape[0]
    cls_ang = ref.new_zeros(1, hd, dtype=torch.float32)
    reg_ang = (rope_angles(reg_freqs, reg_side, reg_side, (reg_side, reg_side)) if reg_freqs is not None
               else ref.new_zeros(reg_side * reg_side, hd, dtype=torch.float32))
    patch_ang = (rope_angles(patch_freqs, n_rows, n_cols, build_grid) if patch_freqs is not None
                 else ref.new_zeros(n_rows * n_cols, hd, dtype=torch.float32))
    ang = torch.cat([cls_ang, reg_ang, patch_ang])
    sin = ang.sin().unflatten(-1, (-1, 2))  # (N, hd/2, 2): the channel pairs, both of a pair at one angle
    sin = torch.stack([-sin[..., 0], sin[..., 1]], dim=-1).flatten(-2)  # [-s0 +s0 -s1 +s1 ...]
    return ang.cos().to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs: (a, b) -> (a cos - b sin, b cos + a sin).

    `sin` comes pre-signed per pair, [-s0 +s0 -s1 +s1 ...], so with the pairs swapped
    ([x0 x1 x2 x3 ...] -> [x1 x0 x3 x2 ...]) the rotation is x*cos + swapped*sin.
    """
    if fast_path(x) == 'cpu' and cos.dtype == torch.float32:
        return _rope_complex(x, cos, sin)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


@torch.jit.unused
def _rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation as one complex multiply, (a + ib) * (cos + i sin): one op forward and one
    backward instead of three and four (CPU training; torch.compile fuses the plain form anyway)."""
    rot = torch.complex(cos[..., ::2], sin[..., 1::2])  # (..., hd/2), odd channels carry +sin
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # pairs (a, b) -> a + ib
    return torch.view_as_real(z * rot).flatten(-2)


# ---- attention --------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with optional QK-norm and rotary embeddings.

    RoPE tables arrive pre-built from the model (one per input grid, shared by all
    blocks), so attention does no per-layer position work.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid: Tuple[int, int],
            qkv_bias: bool = False,
            qk_norm: bool = True,
            norm_layer: str = 'rms',
            rope: bool = True,
            rope_theta: float = 10000.,
            reg_rope: bool = True,
            reg_rope_theta: float = 100.,
            num_registers: int = 4,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            attn_backend: str = 'sdpa',
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_drop = attn_drop
        self.attn_backend = check_attn_backend(attn_backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # buffers in the released order: rope, rope_reg, then the QK norms
        self.rope = RotaryEmbedding2D(self.head_dim, grid, rope_theta) if rope else None
        reg_side = math.isqrt(num_registers)
        self.rope_reg = (RotaryEmbedding2D(self.head_dim, (reg_side, reg_side), reg_rope_theta)
                         if reg_rope and num_registers else None)
        self.q_norm = make_norm(norm_layer, self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm_layer, self.head_dim) if qk_norm else nn.Identity()

    def qkv_heads(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """q, k, v as (B, nh, N, hd) views; q and k normed and rotated, all three in v's dtype."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        # q and k stay stacked, (B, N, 2, nh, hd), so norm and RoPE run once for both. This token-major
        # layout keeps those ops on plain strides, and split's backward (one cat) rebuilds the qkv
        # gradient already in the Linear's layout.
        qk, v = qkv.split([2, 1], dim=2)
        if isinstance(self.q_norm, RMSNorm):
            weight = torch.stack([self.q_norm.weight, self.k_norm.weight]).unsqueeze(1)  # (2, 1, hd)
            qk = rms_norm(qk, weight, self.q_norm.eps)
        elif not isinstance(self.q_norm, nn.Identity):  # LayerNorm ablation
            qk = torch.stack([self.q_norm(qk[:, :, 0]), self.k_norm(qk[:, :, 1])], dim=2)
        if rope is not None:
            cos, sin = rope  # (N, hd), identity rows (cos 1, sin 0) for unrotated tokens
            qk = apply_rope(qk, cos[:, None, None], sin[:, None, None])
        # The norm's float32 weight makes q, k float32 even under autocast; back to v's dtype (the
        # autocast dtype there), so attention runs in it as the released matmuls did. No-op in float32.
        qk = qk.to(v.dtype)
        q, k = qk.unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2)

    def attention_probs(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """softmax(q k^T * scale): (B, nh, N, N), for visualisation and tests."""
        q, k, _ = self.qkv_heads(x, rope)
        return ((q.float() * self.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x, rope)
        drop = self.attn_drop if self.training else 0.
        if self.attn_backend == 'flash_attn' and x.is_cuda:
            x = flash_attention(q, k, v, drop)
        elif self.attn_backend == 'eager':
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = F.dropout(attn, drop, self.training) @ v.to(attn.dtype)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, nh * hd)
        return self.proj_drop(self.proj(x))


ATTN_BACKENDS = ('sdpa', 'flash_attn', 'eager')


def check_attn_backend(name: str) -> str:
    """Validate a backend name; 'flash_attn' needs the flash-attn package to be importable."""
    if name not in ATTN_BACKENDS:
        raise ValueError(f'attn_backend must be one of {ATTN_BACKENDS}, got {name!r}')
    if name == 'flash_attn':
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "attn_backend='flash_attn' (--flash) needs the flash-attn package, which is not installed "
                "(pip install flash-attn --no-build-isolation, CUDA only). The default 'sdpa' backend "
                "already uses PyTorch's flash kernels on GPU.") from e
    return name


@torch.jit.unused
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """flash-attn kernels on (B, nh, N, hd) tensors; they take fp16/bf16 only."""
    from flash_attn import flash_attn_func
    in_dtype = dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else torch.bfloat16
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))  # (B, N, nh, hd)
    out = flash_attn_func(q, k, v, dropout_p=dropout_p)
    # back in the input's dtype: a float32 model without autocast gets float32 for its proj Linear
    return out.transpose(1, 2).to(in_dtype)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x + drop_path(gamma * f(norm(x)))."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid: Tuple[int, int],
            mlp_ratio: float = 4.,
            mlp_type: str = 'gelu',
            norm_layer: str = 'rms',
            init_values: Optional[float] = 1e-4,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            **attn_kwargs,
    ):
        super().__init__()
        # gamma_1/gamma_2 live on the block (not in a LayerScale module) to keep the released key names
        if init_values is not None:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.norm1 = make_norm(norm_layer, dim)
        self.attn = Attention(dim, num_heads, grid, norm_layer=norm_layer, proj_drop=proj_drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = make_norm(norm_layer, dim)
        hidden = int(dim * mlp_ratio)
        if mlp_type == 'gelu':
            self.mlp = Mlp(dim, hidden, act_layer=nn.GELU, drop=proj_drop)
        elif mlp_type == 'swiglu':
            # 2/3 of the hidden width keeps the parameter count of the GELU MLP
            self.mlp = SwiGLU(dim, int(hidden * 2 / 3), drop=proj_drop)
        else:
            raise ValueError(f"mlp_type must be 'gelu' or 'swiglu', got {mlp_type!r}")

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        x = self.add_residual(x, self.attn(self.norm1(x), rope), self.gamma_1)
        x = self.add_residual(x, self.mlp(self.norm2(x)), self.gamma_2)
        return x

    def add_residual(self, x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
        """x + drop_path(gamma * y) as ONE full-size op (addcmul, a plain op every tracer and exporter knows).

        With drop path, its per-sample mask is folded into LayerScale first: DropPath applied to
        ones draws the same (B, 1, 1) mask it would draw for y, and gamma * mask is only (B, 1, D).
        """
        if gamma is None:
            return x + self.drop_path(y)
        if not isinstance(self.drop_path, nn.Identity):
            gamma = gamma * self.drop_path(x.new_ones(x.shape[0], 1, 1))  # (B, 1, D)
        return torch.addcmul(x, y, gamma)


# Turning every ViT-5 component off gives the DeiT-III (LayerScale) baseline.
DEIT3_KWARGS = dict(
    norm_layer='layer', qk_norm=False, rope=False, reg_rope=False, num_registers=0, qkv_bias=True,
)
GLOBAL_POOLS = ('', 'token', 'avg', 'max', 'avgmax')


class PatchEmbed5(PatchEmbed):
    """timm's PatchEmbed (the same weights, set_input_size and feature info) without its size asserts:
    VisionTransformer5 checks every input once, on plain ints, in patch_grid before the projection;
    timm's asserts would check again and, under torch.jit.trace, branch on traced sizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # (B, D, h, w) -> (B, h*w, D), row-major


# ---- size-dependent steps kept opaque to FX (one graph node each, run with real sizes) ---------------
@torch.fx.wrap
def patch_grid(x: torch.Tensor, patch_size: int, fixed: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """(rows, cols) of patches for an image batch (B, C, H, W); refuses H or W not divisible by the patch
    size, and, with `fixed` (dynamic_img_size=False), any other grid."""
    H, W = x.shape[-2], x.shape[-1]
    if not torch.jit.is_scripting() and torch.jit.is_tracing():
        H, W = _traced_input_size(x)
    if torch.compiler.is_compiling():
        _check_divisible(H, W, patch_size)  # a Python `if` would specialise the graph to this size
    elif H % patch_size or W % patch_size:
        raise ValueError(f'input size {H}x{W} is not divisible by the patch size {patch_size}')
    grid = (H // patch_size, W // patch_size)
    if fixed is not None and (grid[0] != fixed[0] or grid[1] != fixed[1]):
        raise ValueError(f'input size {H}x{W} differs from the size the model was built for '
                         f'({fixed[0] * patch_size}x{fixed[1] * patch_size}) and dynamic_img_size is off')
    return grid


@torch.jit.unused
def _traced_input_size(x: torch.Tensor) -> Tuple[int, int]:
    """(H, W) of the image batch that torch.jit.trace (or the legacy ONNX exporter) records, as plain ints.

    A trace is fixed to its input size: the patch grid, the RoPE tables and pos_embed at that grid are
    constants of the graph (only the batch stays dynamic). The tracer hands out sizes as tensors, so every
    Python branch on them would draw a TracerWarning; the size is read outside the tracer here, once."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return int(x.shape[-2]), int(x.shape[-1])
    finally:
        torch._C._set_tracing_state(state)


@torch.jit.unused
def _check_divisible(H: int, W: int, patch_size: int) -> None:
    """The divisibility rule as constraints on the symbolic sizes of torch.compile / torch.export."""
    torch._check(H % patch_size == 0, lambda: f'input height {H} is not divisible by the patch size {patch_size}')
    torch._check(W % patch_size == 0, lambda: f'input width {W} is not divisible by the patch size {patch_size}')


@torch.fx.wrap
def resample_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], build_grid: Tuple[int, int]) -> torch.Tensor:
    """pos_embed (1, G0*G1, D) of the build grid -> (1, h*w, D) for `grid`: bicubic, align_corners=False,
    as the released fine-tuning resampled it.

    Eager returns it untouched at the build size. Under torch.compile / torch.export it is always
    resampled, so no branch on the input size is traced: bicubic at scale 1 (align_corners=False)
    samples every source point with weights (0, 1, 0, 0) and reproduces it exactly.
    """
    if not torch.compiler.is_compiling() and grid[0] == build_grid[0] and grid[1] == build_grid[1]:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, [grid[0], grid[1]], [build_grid[0], build_grid[1]],
                                  num_prefix_tokens=0, interpolation='bicubic', antialias=False,
                                  align_corners=False)


class VisionTransformer5(nn.Module):
    """ViT-5 (and, with `DEIT3_KWARGS`, DeiT-III LS).

    Token layout: [cls] + [registers] + patches (row-major); see the module docstring.
    `pos_embed` covers the patches only and is added before cls and registers are joined.

    Args (ablation switches, defaults = ViT-5):
        norm_layer: 'rms' (RMSNorm) or 'layer' (LayerNorm), for every norm incl. QK-norm.
        init_values: LayerScale init; None turns LayerScale off.
        qk_norm: normalise q and k per head before RoPE.
        rope / rope_theta: 2D RoPE on patch tokens.
        reg_rope / reg_rope_theta: separate (high-frequency) 2D RoPE on the registers.
        num_registers: register tokens, 0 or a perfect square (they sit on a square grid).
        abs_pos_embed: learnt absolute position embedding on the patches.
        qkv_bias: bias in the qkv projection.
        mlp_type: 'gelu' or 'swiglu'.
        attn_backend: 'sdpa' (default), 'flash_attn' (flash-attn package) or 'eager' (explicit softmax).
    timm's options:
        global_pool: what the head reads: 'token' (class token, released), 'avg' / 'max' / 'avgmax'
            over the patch tokens, or '' (every token).
        dynamic_img_size: True (default, as released): any H x W divisible by the patch size, with
            pos_embed resampled and RoPE positions scaled; False: only the build size.
    """
    dynamic_img_size: Final[bool]

    __jit_ignored_attributes__ = ['_rope_cache']  # an eager-only cache; scripted code builds the tables

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: str = 'rms',
            init_values: Optional[float] = 1e-4,
            qk_norm: bool = True,
            rope: bool = True,
            rope_theta: float = 10000.,
            reg_rope: bool = True,
            reg_rope_theta: float = 100.,
            num_registers: int = 4,
            abs_pos_embed: bool = True,
            qkv_bias: bool = False,
            mlp_type: str = 'gelu',
            attn_backend: str = 'sdpa',
            dynamic_img_size: bool = True,
    ):
        super().__init__()
        if num_registers < 0 or math.isqrt(num_registers) ** 2 != num_registers:
            raise ValueError(f'num_registers must be 0 or a perfect square (they sit on a square grid), '
                             f'got {num_registers}')
        self.num_classes = num_classes
        self.global_pool = check_global_pool(global_pool)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_registers = self.num_reg_tokens = num_registers
        self.reg_side = math.isqrt(num_registers)  # registers sit on a reg_side x reg_side grid
        self.num_prefix_tokens = 1 + num_registers  # cls + registers, ahead of the patches
        self.has_class_token = True
        self.no_embed_class = True  # pos_embed has no slot for the prefix tokens
        self.dynamic_img_size = dynamic_img_size
        self.patch_size = patch_size
        self.grad_checkpointing = False

        img_size = to_2tuple(img_size)
        check_img_size(img_size, patch_size)
        self.patch_embed = PatchEmbed5(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.grid = self.patch_embed.grid_size  # (rows, cols) at the build size
        num_patches = self.grid[0] * self.grid[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim)) if abs_pos_embed else None

        self.blocks = nn.ModuleList([
            Block(
                embed_dim, num_heads, self.grid, mlp_ratio=mlp_ratio, mlp_type=mlp_type, norm_layer=norm_layer,
                init_values=init_values, proj_drop=proj_drop_rate, drop_path=drop_path_rate,  # same rate each block
                qkv_bias=qkv_bias, qk_norm=qk_norm, rope=rope, rope_theta=rope_theta, reg_rope=reg_rope,
                reg_rope_theta=reg_rope_theta, num_registers=num_registers, attn_drop=attn_drop_rate,
                attn_backend=attn_backend,
            )
            for _ in range(depth)])
        # what features_only / forward_intermediates offer: every block's output, one token per patch
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self.norm = make_norm(norm_layer, embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        # (rows, cols, device, dtype) -> (the frequency buffers and their versions, (cos, sin)); eager only
        self._rope_cache = {}
        self.init_weights()

    # ---- construction helpers -------------------------------------------------------------
    def init_weights(self):
        for p in (self.cls_token, self.reg_token, self.pos_embed):
            if p is not None:
                trunc_normal_(p, std=.02)
        self.apply(_init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed', 'cls_token', 'reg_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise lr decay: stem, one group per block, final norm."""
        return dict(
            stem=r'^cls_token|^pos_embed|^reg_token|^patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def set_attn_backend(self, name: str):
        check_attn_backend(name)
        for blk in self.blocks:
            blk.attn.attn_backend = name

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """A new head for `num_classes` (0: none, forward returns the pooled features), on the model's
        device and dtype; `global_pool` ('token', 'avg', 'max', 'avgmax', '') changes what it reads."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        ref = self.cls_token
        self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_linear(self.head)
        self.head.train(self.training)

    @torch.jit.ignore
    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[int] = None):
        """Rebuild for another build size (and/or patch size, timm's PatchEmbed resamples the kernel).

        Gives the model a build at the new size would be after loading these weights through
        checkpoint_filter_fn: pos_embed resampled bicubically, RoPE positions scaled to the new grid.
        """
        if img_size is not None:
            check_img_size(to_2tuple(img_size), patch_size or self.patch_size)
        old_grid = self.grid
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        self.patch_size = self.patch_embed.patch_size[0]
        self.grid = self.patch_embed.grid_size
        if self.pos_embed is not None and tuple(self.grid) != tuple(old_grid):
            with torch.no_grad():
                pos = resample_pos_embed(self.pos_embed, tuple(self.grid), tuple(old_grid))
            self.pos_embed = nn.Parameter(pos, requires_grad=self.pos_embed.requires_grad)
        for blk in self.blocks:
            if blk.attn.rope is not None:
                blk.attn.rope.grid = tuple(self.grid)
        for info in self.feature_info:
            info['reduction'] = self.patch_size
        self._rope_cache.clear()
        try:  # timm >= 1.0.26 records the size a model now takes (get_model_input_config)
            from timm.models._input import update_model_input_size
        except ImportError:
            return
        update_model_input_size(self, self.patch_embed.img_size, patch_size=patch_size)

    # ---- positions ------------------------------------------------------------------------
    def grid_for(self, x: torch.Tensor) -> Tuple[int, int]:
        """(rows, cols) of patches of the image batch x; a ValueError for a size the model cannot take."""
        return patch_grid(x, self.patch_size, None if self.dynamic_img_size else self.grid)

    def rope_tables(self, n_rows: int, n_cols: int, dtype: torch.dtype) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) of shape (1 + R + n_rows*n_cols, head_dim) in token order, or None without RoPE.

        Built from the first block's buffers: all blocks hold the same frequencies.
        """
        if len(self.blocks) == 0:
            return None
        attn = self.blocks[0].attn
        patch_freqs = attn.rope.freqs if attn.rope is not None else None
        reg_freqs = attn.rope_reg.freqs if attn.rope_reg is not None else None
        if patch_freqs is None and reg_freqs is None:
            return None
        return rope_tables(patch_freqs, reg_freqs, n_rows, n_cols, self.grid, self.reg_side, dtype)

    @torch.jit.unused
    def cached_rope_tables(self, n_rows: int, n_cols: int,
                           dtype: torch.dtype) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """rope_tables, built once per (grid, device, dtype) in eager: at most one entry each.

        An entry remembers the frequency buffers it was built from and their versions; when either
        changed (new weights loaded, the buffers replaced or written in place) it is rebuilt in place
        of the old one, so the cache never grows with the number of steps. The tables are built as
        ordinary tensors even under torch.inference_mode(), so a later training forward at the same
        size can save them for its backward.
        """
        if len(self.blocks) == 0:
            return None
        attn = self.blocks[0].attn
        freqs = [m.freqs for m in (attn.rope, attn.rope_reg) if m is not None]
        if not freqs:
            return None
        key = (n_rows, n_cols, freqs[0].device, dtype)
        # (an inference tensor keeps no version: one made under inference_mode cannot change outside it)
        source = tuple((b, -1 if b.is_inference() else b._version) for b in freqs)
        entry = self._rope_cache.get(key)
        if entry is None or len(entry[0]) != len(source) or any(
                b is not old or v != old_v for (b, v), (old, old_v) in zip(source, entry[0])):
            with torch.inference_mode(False), torch.no_grad():
                entry = self._rope_cache[key] = (source, self.rope_tables(n_rows, n_cols, dtype))
        return entry[1]

    def _pos_embed(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, h*w, D) patch tokens -> (B, 1 + R + h*w, D): cls, registers, patches + position embedding."""
        if self.pos_embed is not None:
            x = x + resample_pos_embed(self.pos_embed, grid, self.grid)
        B = x.shape[0]
        if self.reg_token is not None:
            return torch.cat([self.cls_token.expand(B, -1, -1), self.reg_token.expand(B, -1, -1), x], dim=1)
        return torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)

    def _embed(
            self, x: torch.Tensor,
    ) -> Tuple[torch.Tensor, Tuple[int, int], Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        """Image batch -> (tokens, patch grid, RoPE tables shared by every block)."""
        grid = self.grid_for(x)
        x = self._pos_embed(self.patch_embed(x), grid)
        if is_traced(x):  # tracers get the table ops themselves, no cache
            return x, grid, self.rope_tables(grid[0], grid[1], x.dtype)
        return x, grid, self.cached_rope_tables(grid[0], grid[1], x.dtype)

    # ---- forward --------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + R + h*w, D): all tokens after the final norm."""
        x, _, rope = self._embed(x)
        for blk in self.blocks:
            if not torch.jit.is_scripting() and self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = global_pool_nlc(x, self.global_pool, self.num_prefix_tokens)  # 'token': the class token
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ):
        """Outputs of chosen blocks for dense tasks (timm's API).

        indices: None (all), an int n (last n blocks) or a list of block indices.
        Returns patch maps (B, D, h, w) ('NCHW') or (B, h*w, D) ('NLC'); with
        return_prefix_tokens, (map, tokens) pairs where tokens = cls + registers (B, 1 + R, D).
        norm applies the final norm to each; unless intermediates_only, also returns the final
        normed features of all tokens (the blocks after the last index run only then, or without stop_early).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, (h, w), rope = self._embed(x)
        blocks = self.blocks
        if not torch.jit.is_scripting() and (stop_early or intermediates_only):
            blocks = self.blocks[:max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            if not torch.jit.is_scripting() and self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope)
            if i in take:
                y = self.norm(x) if norm else x
                patches = y[:, self.num_prefix_tokens:]
                if output_fmt == 'NCHW':
                    patches = patches.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append((patches, y[:, :self.num_prefix_tokens]) if return_prefix_tokens else patches)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last of `indices` (and the final norm / the head); returns the
        absolute indices kept, for forward_intermediates."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take

    @torch.no_grad()
    def get_attention_maps(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None):
        """Attention probabilities of chosen blocks: {block index: (B, heads, N, N)}.

        Token order along both N axes: [cls] + [registers] + patches (row-major h x w), so the
        patches are [:, :, :, model.num_prefix_tokens:]; the grid (h, w) is returned too:
        `maps, (h, w) = model.get_attention_maps(img)`.
        """
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid, rope = self._embed(x)
        maps = {}
        for i, blk in enumerate(self.blocks[:max_index + 1]):
            if i in take:
                maps[i] = blk.attn.attention_probs(blk.norm1(x), rope)
            x = blk(x, rope)
        return maps, grid


def check_img_size(img_size: Tuple[int, int], patch_size: int) -> None:
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise ValueError(f'img_size {img_size[0]}x{img_size[1]} is not divisible by the patch size {patch_size}')


def check_global_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f'global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}')
    return global_pool


def _init_linear(m: nn.Module):
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---- checkpoints --------------------------------------------------------------------------------
CHECKPOINT_KEYS = ('model', 'state_dict', 'model_ema', 'state_dict_ema')
STRIP_PREFIXES = ('module.', '_orig_mod.')


def checkpoint_state_dict(checkpoint: dict, use_ema: bool = False) -> dict:
    """The weights in a checkpoint as the file holds them, DDP ('module.') and torch.compile
    ('_orig_mod.') prefixes stripped. Accepts a raw state dict or a checkpoint dict holding one under
    'model' / 'state_dict' (or 'model_ema' / 'state_dict_ema' first when use_ema)."""
    order = CHECKPOINT_KEYS[2:] + CHECKPOINT_KEYS[:2] if use_ema else CHECKPOINT_KEYS
    for key in order:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    out = {}
    for k, v in checkpoint.items():
        while k.startswith(STRIP_PREFIXES):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: dict, model: VisionTransformer5, use_ema: bool = False) -> dict:
    """Adapt a checkpoint to `model` (timm's convention).

    Takes the weights out of the checkpoint (`checkpoint_state_dict`), resamples `pos_embed` to
    the model's patch grid (bicubic, align_corners=False, as the released fine-tuning recipe does)
    and fills RoPE frequency buffers the file lacks from the model. The classifier head is kept as it is.
    """
    out = checkpoint_state_dict(state_dict, use_ema)

    if 'pos_embed' in out and model.pos_embed is not None:
        pos = out['pos_embed']
        old = math.isqrt(pos.shape[1])
        if old * old != pos.shape[1]:
            raise ValueError(f'checkpoint pos_embed has {pos.shape[1]} positions, not a square patch grid')
        out['pos_embed'] = resample_pos_embed(pos, tuple(model.grid), (old, old))  # unchanged at the same grid

    for name, buf in model.named_buffers():
        if name.endswith('.freqs') and name not in out:
            out[name] = buf.detach().clone()
    return out


# ---- variants and timm registry -----------------------------------------------------------------
SIZES = dict(
    tiny=dict(embed_dim=192, depth=12, num_heads=3),
    small=dict(embed_dim=384, depth=12, num_heads=6),
    base=dict(embed_dim=768, depth=12, num_heads=12),
    large=dict(embed_dim=1024, depth=24, num_heads=16),
    xlarge=dict(embed_dim=1152, depth=28, num_heads=16),
)
HF_HUB_ID = 'FengWang3211/ViT-5'  # the Hugging Face Hub repo holding the released files


def _cfg(hub_file: Optional[str] = None, input_size: int = 224, **kwargs) -> dict:
    # fixed_input_size=True as for timm's ViTs: the tag's size becomes the default img_size (384 for
    # *_384); the models still take other sizes (dynamic_img_size)
    hub = dict(hf_hub_id=HF_HUB_ID, hf_hub_filename=hub_file) if hub_file else {}
    return dict(
        **hub, num_classes=1000, input_size=(3, input_size, input_size), pool_size=None,
        crop_pct=1.0, interpolation='bicubic', fixed_input_size=True,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv='patch_embed.proj', classifier='head', license='apache-2.0', **kwargs)


# crop_pct 1.0 is the released --eval-crop-ratio. Published top-1 in `notes`.
default_cfgs = generate_default_cfgs({
    'vit5_tiny.untrained': _cfg(),
    'vit5_small.in1k': _cfg('vit5_small_patch16_224.pth', notes=('ImageNet-1k top-1 82.2',)),
    'vit5_base.in1k': _cfg('vit5_base_patch16_224.pth', notes=('ImageNet-1k top-1 84.2',)),
    'vit5_base.in1k_384': _cfg('vit5_base_patch16_384.pth', input_size=384, notes=('ImageNet-1k top-1 85.4',)),
    'vit5_large.in1k': _cfg('vit5_large_patch16_224.pth', notes=('ImageNet-1k top-1 84.9',)),
    'vit5_large.in1k_384': _cfg('vit5_large_patch16_384.pth', input_size=384, notes=('ImageNet-1k top-1 86.0',)),
    'vit5_xlarge.untrained': _cfg(),
    'deit_small_patch16_LS.untrained': _cfg(),
    'deit_base_patch16_LS.untrained': _cfg(),
    'deit_large_patch16_LS.untrained': _cfg(),
})


def released_cfg(name: str) -> Optional[dict]:
    """The pretrained cfg of a released tag ('vit5_small.in1k', or 'vit5_small' for its default tag),
    or None when `name` names no released file of ours."""
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # an unknown model name
        return None
    if cfg is None or cfg.hf_hub_id != HF_HUB_ID or not cfg.hf_hub_filename:
        return None
    return cfg.to_dict()


def pretrained_file(name: str) -> str:
    """A local checkpoint path for `name`: an existing file as it is, a released tag
    ('vit5_small.in1k') through the Hugging Face cache (downloaded once when online, read from the
    cache when HF_HUB_OFFLINE=1), anything else unchanged (the caller reports a missing file).

    Raises FileNotFoundError, naming the tag, the repo and the file, when the file can be neither
    found in the cache nor downloaded.
    """
    cfg = None if os.path.isfile(name) else released_cfg(name)
    if cfg is None:
        return name
    from huggingface_hub import hf_hub_download  # a timm dependency; imported only for a tag
    repo, file = cfg['hf_hub_id'], cfg['hf_hub_filename']
    try:
        return hf_hub_download(repo, file)
    except OSError as err:  # offline and not cached, no network, repo or file gone
        raise FileNotFoundError(
            f'{name}: {file} of the Hugging Face Hub repo {repo} is not in the local cache and could not be '
            f'downloaded ({type(err).__name__}); fetch it once with network access (e.g. `hf download {repo} '
            f'{file}`), or pass the path of a copy') from None


def _create(variant: str, size: str, pretrained: bool = False, base_kwargs: Optional[dict] = None, **kwargs):
    kwargs = {**SIZES[size], **(base_kwargs or {}), **kwargs}  # caller kwargs override the table
    # features_only=True wraps the model in timm's FeatureGetterNet (forward_intermediates), as timm's ViTs
    feature_cfg = dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter')
    if not pretrained:
        return build_model_with_cfg(VisionTransformer5, variant, False, feature_cfg=feature_cfg, **kwargs)
    # Released files pickle an argparse.Namespace next to the weights: allow it, nothing else. EMA
    # weights when the file has them: timm's rule for checkpoint files, so a file read from the Hub
    # and the same file given as pretrained_cfg_overlay=dict(file=...) load alike.
    import argparse
    from functools import partial
    with torch.serialization.safe_globals([argparse.Namespace]):
        return build_model_with_cfg(VisionTransformer5, variant, True, feature_cfg=feature_cfg,
                                    pretrained_filter_fn=partial(checkpoint_filter_fn, use_ema=True), **kwargs)


@register_model
def vit5_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer5:
    return _create('vit5_tiny', 'tiny', pretrained, **kwargs)


@register_model
def vit5_small(pretrained: bool = False, **kwargs) -> VisionTransformer5:
    return _create('vit5_small', 'small', pretrained, **kwargs)


@register_model
def vit5_base(pretrained: bool = False, **kwargs) -> VisionTransformer5:
    return _create('vit5_base', 'base', pretrained, **kwargs)


@register_model
def vit5_large(pretrained: bool = False, **kwargs) -> VisionTransformer5:
    return _create('vit5_large', 'large', pretrained, **kwargs)


@register_model
def vit5_xlarge(pretrained: bool = False, **kwargs) -> VisionTransformer5:
    return _create('vit5_xlarge', 'xlarge', pretrained, **kwargs)


@register_model
def deit_small_patch16_LS(pretrained: bool = False, **kwargs) -> VisionTransformer5:
    return _create('deit_small_patch16_LS', 'small', pretrained, DEIT3_KWARGS, **kwargs)


@register_model
def deit_base_patch16_LS(pretrained: bool = False, **kwargs) -> VisionTransformer5:
    return _create('deit_base_patch16_LS', 'base', pretrained, DEIT3_KWARGS, **kwargs)


@register_model
def deit_large_patch16_LS(pretrained: bool = False, **kwargs) -> VisionTransformer5:
    return _create('deit_large_patch16_LS', 'large', pretrained, DEIT3_KWARGS, **kwargs)
