"""ViT-5: the plain ViT with modernised parts.

patch embed -> (+ abs pos embed) -> [cls] + patches + [registers]
            -> L x Block(RMSNorm -> attention with QK-norm + 2D RoPE -> LayerScale,
                         RMSNorm -> GELU MLP -> LayerScale)
            -> RMSNorm -> head(cls)

The parameter and buffer names equal those of the released checkpoints
(`tests/data/checkpoint_layout.json`), so released files load strictly.
Every component the paper ablates is one constructor argument; with
`DEIT3_KWARGS` the same class is the DeiT-III (LayerScale) baseline.

`import models_vit5` registers every variant with timm:
    model = timm.create_model('vit5_base', num_classes=100, img_size=192)
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, SwiGLU, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

__all__ = ['VisionTransformer5', 'checkpoint_filter_fn', 'DEIT3_KWARGS']


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
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        # e.g. bf16 under autocast: normalise in float32, cast back, then scale (see RMSNorm)
        return F.rms_norm(x.float(), x.shape[-1:], None, eps).type_as(x) * weight
    if x.device.type == 'cpu' and not torch.compiler.is_compiling():
        return _RMSNormCPU.apply(x, weight, eps)
    if weight.dim() == 1:
        return F.rms_norm(x, x.shape[-1:], weight, eps)  # one fused kernel on CUDA
    return F.rms_norm(x, x.shape[-1:], None, eps) * weight


class _RMSNormCPU(torch.autograd.Function):
    """float32 RMSNorm with a hand-written backward, for CPU.

    CPU has no fused RMSNorm kernel: F.rms_norm runs as pow, mean, rsqrt, mul, mul, and autograd
    adds ~9 full-size ops behind it. This does 3 full-size ops forward and 6-7 backward; on a busy
    CPU each parallel op also waits for scheduler time, so the op count matters as much as the bytes.
    Same maths as F.rms_norm (float32 throughout, so "normalise, cast back, scale" holds trivially).
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


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """freqs[i] = theta ** (-2i / (head_dim / 2)), i < head_dim / 4 (one quarter per axis half)."""
    if head_dim % 4:
        raise ValueError(f'2D RoPE needs head_dim divisible by 4, got {head_dim}')
    quarter = head_dim // 4
    return theta ** (-torch.arange(quarter, dtype=torch.float32) * 2 / (head_dim // 2))


class RotaryEmbedding2D(nn.Module):
    """Angles of a 2D rotary embedding over an (n_rows, n_cols) grid.

    Channel layout of one head (head_dim = 4Q, freqs f0..f{Q-1}):
        channels [0, 2Q):  row angle    r*f0 r*f0 r*f1 r*f1 ... r*f{Q-1} r*f{Q-1}
        channels [2Q, 4Q): column angle c*f0 c*f0 ...             c*f{Q-1} c*f{Q-1}
    Each frequency covers two ADJACENT channels, which are rotated together
    (see `apply_rope`). Positions are scaled to the build grid:
    row r of an n-row grid sits at r / n * grid[0], so a grid of the build size
    has positions 0 .. G-1 and other sizes span the same range.

    `freqs` is a persistent buffer because the released checkpoints carry it.
    """

    def __init__(self, head_dim: int, grid: Tuple[int, int], theta: float = 10000.):
        super().__init__()
        self.grid = tuple(grid)
        self.register_buffer('freqs', rope_frequencies(head_dim, theta), persistent=True)

    def angles(self, n_rows: int, n_cols: int) -> torch.Tensor:
        """(n_rows * n_cols, head_dim) angles, positions row-major (index = row * n_cols + col)."""
        device = self.freqs.device
        rows = torch.arange(n_rows, device=device, dtype=torch.float32) / n_rows * self.grid[0]
        cols = torch.arange(n_cols, device=device, dtype=torch.float32) / n_cols * self.grid[1]
        freqs = self.freqs.float().repeat_interleave(2)  # [f0 f0 f1 f1 ...]
        row_ang = torch.outer(rows, freqs)  # (n_rows, 2Q)
        col_ang = torch.outer(cols, freqs)  # (n_cols, 2Q)
        ang = torch.cat([
            row_ang[:, None, :].expand(n_rows, n_cols, -1),
            col_ang[None, :, :].expand(n_rows, n_cols, -1),
        ], dim=-1)
        return ang.reshape(n_rows * n_cols, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs: (a, b) -> (a cos - b sin, b cos + a sin).

    `sin` comes pre-signed per pair, [-s0 +s0 -s1 +s1 ...], so with the pairs swapped
    ([x0 x1 x2 x3 ...] -> [x1 x0 x3 x2 ...]) the rotation is x*cos + swapped*sin.
    In eager float32 the same rotation is one complex multiply, (a + ib) * (cos + i sin):
    one op forward and one backward instead of three and four (torch.compile fuses either).
    """
    if x.dtype == torch.float32 and cos.dtype == torch.float32 and not torch.compiler.is_compiling():
        rot = torch.complex(cos[..., ::2], sin[..., 1::2])  # (..., hd/2), odd channels carry +sin
        x = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # pairs (a, b) -> a + ib
        return torch.view_as_real(x * rot).flatten(-2)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


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

    def qkv_heads(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]]):
        """q, k, v as (B, nh, N, hd) views; q and k normed and rotated."""
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
        q, k = qk.unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2)

    def attention_probs(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        """softmax(q k^T * scale): (B, nh, N, N), for visualisation and tests."""
        q, k, _ = self.qkv_heads(x, rope)
        return ((q.float() * self.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x, rope)
        drop = self.attn_drop if self.training else 0.
        if self.attn_backend == 'flash_attn' and x.is_cuda:
            x = flash_attention(q, k, v, drop)
        elif self.attn_backend == 'eager':
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = F.dropout(attn, drop, self.training) @ v.to(attn.dtype)
        else:
            x = F.scaled_dot_product_attention(q, k, v.to(q.dtype), dropout_p=drop)
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


def flash_attention(q, k, v, dropout_p: float) -> torch.Tensor:
    """flash-attn kernels on (B, nh, N, hd) tensors; they take fp16/bf16 only."""
    from flash_attn import flash_attn_func
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else torch.bfloat16
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))  # (B, N, nh, hd)
    out = flash_attn_func(q, k, v, dropout_p=dropout_p)
    return out.transpose(1, 2)


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

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        x = self.add_residual(x, self.attn(self.norm1(x), rope), self.gamma_1)
        x = self.add_residual(x, self.mlp(self.norm2(x)), self.gamma_2)
        return x

    def add_residual(self, x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
        """x + drop_path(gamma * y) as ONE full-size op (addcmul).

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


class VisionTransformer5(nn.Module):
    """ViT-5 (and, with `DEIT3_KWARGS`, DeiT-III LS).

    Token order: [cls] + patches (row-major) + [registers]. `pos_embed` covers
    the patches only and is added before cls and registers are joined.

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
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
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
    ):
        super().__init__()
        if num_registers < 0 or math.isqrt(num_registers) ** 2 != num_registers:
            raise ValueError(f'num_registers must be 0 or a perfect square (they sit on a square grid), '
                             f'got {num_registers}')
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # the class token; registers follow the patches
        self.num_registers = num_registers
        self.patch_size = patch_size
        self.grad_checkpointing = False

        img_size = to_2tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f'img_size {img_size[0]}x{img_size[1]} is not divisible by the patch size {patch_size}')
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
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
        self.norm = make_norm(norm_layer, embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self._rope_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
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

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_linear(self.head)

    # ---- positions ------------------------------------------------------------------------
    def grid_for(self, x: torch.Tensor) -> Tuple[int, int]:
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f'input size {H}x{W} is not divisible by the patch size {p}')
        return H // p, W // p

    def rope_tables(self, n_rows: int, n_cols: int, dtype: torch.dtype):
        """(cos, sin) of shape (1 + n_rows*n_cols + num_registers, head_dim), or None without RoPE.

        Built once per (grid, device, dtype) from the first block's buffers (all blocks hold the
        same frequencies) and cached; the class token gets cos 1 / sin 0 (not rotated).
        The cache key includes the buffers' version, so loading new weights rebuilds it.
        """
        attn = self.blocks[0].attn if len(self.blocks) else None
        if attn is None or (attn.rope is None and attn.rope_reg is None):
            return None
        ref = attn.rope.freqs if attn.rope is not None else attn.rope_reg.freqs
        key = (n_rows, n_cols, ref.device, dtype,
               tuple(m.freqs._version for m in (attn.rope, attn.rope_reg) if m is not None))
        compiling = torch.compiler.is_compiling()
        if not compiling and key in self._rope_cache:
            return self._rope_cache[key]
        hd = attn.head_dim
        zeros = lambda n: ref.new_zeros(n, hd, dtype=torch.float32)  # noqa: E731
        n_reg_side = math.isqrt(self.num_registers)
        ang = torch.cat([
            zeros(1),  # cls
            attn.rope.angles(n_rows, n_cols) if attn.rope is not None else zeros(n_rows * n_cols),
            attn.rope_reg.angles(n_reg_side, n_reg_side) if attn.rope_reg is not None else zeros(self.num_registers),
        ])
        sign = torch.tensor([-1., 1.], device=ref.device).repeat(hd // 2)  # pre-signed sin, see apply_rope
        tables = ang.cos().to(dtype), (ang.sin() * sign).to(dtype)
        if not compiling:
            self._rope_cache[key] = tables
        return tables

    def _pos_embed(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, h*w, D) patch tokens -> (B, 1 + h*w + R, D) with position embedding, cls, registers."""
        if self.pos_embed is not None:
            pos = self.pos_embed
            if grid != tuple(self.grid):
                pos = resample_abs_pos_embed(pos, list(grid), list(self.grid), num_prefix_tokens=0,
                                             interpolation='bicubic', antialias=False, align_corners=False)
            x = x + pos
        B = x.shape[0]
        tokens = [self.cls_token.expand(B, -1, -1), x]
        if self.reg_token is not None:
            tokens.append(self.reg_token.expand(B, -1, -1))
        return torch.cat(tokens, dim=1)

    def _embed(self, x: torch.Tensor):
        grid = self.grid_for(x)
        x = self._pos_embed(self.patch_embed(x), grid)
        return x, grid, self.rope_tables(*grid, x.dtype)

    def _run_block(self, blk: Block, x: torch.Tensor, rope) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(blk, x, rope, use_reentrant=False)
        return blk(x, rope)

    # ---- forward --------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + h*w + R, D): all tokens after the final norm."""
        x, _, rope = self._embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x, rope)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x[:, 0])  # class token
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            return_prefix_tokens: bool = False,
    ):
        """Outputs of chosen blocks for dense tasks (timm's API).

        indices: None (all), an int n (last n blocks) or a list of block indices.
        Returns patch maps (B, D, h, w) ('NCHW') or (B, h*w, D) ('NLC'); with
        return_prefix_tokens, (map, tokens) pairs where tokens = cls + registers (B, 1 + R, D).
        Unless intermediates_only, also returns the final normed features.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, (h, w), rope = self._embed(x)
        B, n_patch = x.shape[0], h * w
        intermediates = []
        blocks = self.blocks if intermediates_only is False else self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x, rope)
            if i in take:
                y = self.norm(x) if norm else x
                patches = y[:, 1:1 + n_patch]
                if output_fmt == 'NCHW':
                    patches = patches.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()
                if return_prefix_tokens:
                    prefix = torch.cat([y[:, :1], y[:, 1 + n_patch:]], dim=1)
                    patches = (patches, prefix)
                intermediates.append(patches)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    @torch.no_grad()
    def get_attention_maps(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None):
        """Attention probabilities of chosen blocks: {block index: (B, heads, N, N)}.

        Token order along both N axes: [cls] + patches (row-major h x w) + [registers];
        the grid (h, w) is returned too: `maps, (h, w) = model.get_attention_maps(img)`.
        """
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid, rope = self._embed(x)
        maps = {}
        for i, blk in enumerate(self.blocks[:max_index + 1]):
            if i in take:
                maps[i] = blk.attn.attention_probs(blk.norm1(x), rope)
            x = blk(x, rope)
        return maps, grid


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
        if (old, old) != tuple(model.grid):
            out['pos_embed'] = resample_abs_pos_embed(
                pos, list(model.grid), [old, old], num_prefix_tokens=0,
                interpolation='bicubic', antialias=False, align_corners=False)

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


def _cfg(file: Optional[str] = None, input_size: int = 224, **kwargs) -> dict:
    return dict(
        file=file, num_classes=1000, input_size=(3, input_size, input_size), pool_size=None,
        crop_pct=1.0, interpolation='bicubic', fixed_input_size=True,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv='patch_embed.proj', classifier='head', license='apache-2.0', **kwargs)


# Released files (local paths: pass `pretrained_cfg_overlay=dict(file=PATH)`). crop_pct 1.0 is the
# released --eval-crop-ratio. Published top-1 in `notes`.
default_cfgs = generate_default_cfgs({
    'vit5_tiny.untrained': _cfg(),
    'vit5_small.in1k': _cfg('vit5_small_patch16_224.pth', notes=('ImageNet-1k top-1 82.2',)),
    'vit5_base.in1k': _cfg('vit5_base_patch16_224.pth', notes=('ImageNet-1k top-1 84.2',)),
    'vit5_base.in1k_384': _cfg('vit5_base_patch16_384.pth', input_size=384, notes=('ImageNet-1k top-1 85.4',)),
    'vit5_large.in1k': _cfg('vit5_large_patch16_224.pth', notes=('ImageNet-1k top-1 84.9',)),
    'vit5_large.in1k_384': _cfg(input_size=384, notes=('ImageNet-1k top-1 86.0',)),  # not released yet
    'vit5_xlarge.untrained': _cfg(),
    'deit_small_patch16_LS.untrained': _cfg(),
    'deit_base_patch16_LS.untrained': _cfg(),
    'deit_large_patch16_LS.untrained': _cfg(),
})


def _create(variant: str, size: str, pretrained: bool = False, base_kwargs: Optional[dict] = None, **kwargs):
    kwargs = {**SIZES[size], **(base_kwargs or {}), **kwargs}  # caller kwargs override the table
    if pretrained:
        # released files pickle an argparse.Namespace next to the weights: allow it, nothing else
        import argparse
        with torch.serialization.safe_globals([argparse.Namespace]):
            return build_model_with_cfg(VisionTransformer5, variant, True,
                                        pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    return build_model_with_cfg(VisionTransformer5, variant, False, **kwargs)


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
