"""ViT building blocks with timm's parameter names, and the fixed 2-D sin-cos position embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm ``Mlp`` names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` names: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attention: str = "auto") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, backend=attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided conv (timm ``PatchEmbed``: ``proj``).

    ``forward`` embeds every patch (the official order). :meth:`patches` + :meth:`embed_patches` do the same
    in two parts, so a caller can drop patches in between (MAE gathers the visible pixel patches first): the
    conv with kernel = stride = p is a linear map of each (C, p, p) patch by ``proj.weight`` viewed as
    (D, C*p*p), so both give the same numbers up to float rounding, with the same parameters.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        """Checks the size; returns the conv's compute dtype for the images (the autocast dtype, else the
        weights'; the loss target stays fp32)."""
        B, C, H, W = x.shape
        if H != self.img_size or W != self.img_size:
            raise ValueError(f"input images are {H}x{W}, the model expects {self.img_size}x{self.img_size}")
        kind, dtype = x.device.type, self.proj.weight.dtype
        if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):  # (no autocast state on "meta")
            dtype = torch.get_autocast_dtype(kind)
        return dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last so the conv writes NHWC and the tokens come out as a contiguous (B, N, D): the masking
        # kernel gathers rows in place, no copy first
        x = x.to(dtype=self._dtype(x), memory_format=torch.channels_last)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> contiguous (B, N, C*p*p) pixel patches in the compute dtype, each flattened in the
        conv weight's (c, i, j) order (not :meth:`MaskedAutoencoderViT.patchify`'s target order)."""
        x = x.to(self._dtype(x))
        B, C = x.shape[:2]
        p, g = self.patch_size, self.grid_size
        x = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        return x.reshape(B, g * g, C * p * p)  # one copy (with the dtype cast above fused by the compiler)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, T, C*p*p) pixel patches from :meth:`patches` (any subset of them) -> (B, T, D) tokens."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


def init_vit_weights(module: nn.Module) -> None:
    """The official MAE/ViT initialisation: xavier_uniform linears with zero bias, LayerNorm (1, 0), and the
    patch-embedding conv initialised as a linear layer (xavier_uniform on its (D, C*p*p) view)."""
    for m in module.modules():
        if isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding (M,) -> (M, dim): first half sin, second half cos (official MAE)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid_size**2 [+1], dim), float32.

    Same values as the official ``get_2d_sincos_pos_embed``: the first half of the channels encodes
    the column (w) coordinate, the second the row (h); a zero row is prepended for the cls token.
    """
    gh = torch.arange(grid_size, dtype=torch.float64)
    gw = torch.arange(grid_size, dtype=torch.float64)
    w, h = torch.meshgrid(gw, gh, indexing="xy")  # each (grid, grid): w[i, j] = j, h[i, j] = i
    emb = torch.cat([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], dim=1)  # (grid*grid, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
