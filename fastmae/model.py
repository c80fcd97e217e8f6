"""The masked autoencoder (He et al. 2021) as a plain nn.Module, parameter for parameter the official
``models_mae.MaskedAutoencoderViT``: official ``mae_pretrain_vit_*.pth`` / ``mae_visualize_vit_*.pth``
state dicts load with ``load_state_dict`` and the encoder loads into timm's ViT.

What differs is how the hot operations run, each behind one switch with the plain path kept:
masking (``torch`` reference | fused ``triton`` kernel) and attention (``math`` | ``sdpa`` | ``flash``).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MASKING_BACKENDS, MaskConfig, ModelConfig, validate_mask, validate_model
from .kernels import num_kept, random_masking_ref, triton_available
from .kernels.mask_patterns import pattern_keys
from .layers import Block, PatchEmbed, init_vit_weights, sincos_2d


def resolve_masking_backend(backend: str, device: torch.device | str) -> str:
    """The masking implementation that runs for ``backend`` on ``device``."""
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("mask.backend=triton needs the triton package; use mask.backend=torch or auto")
    if backend not in MASKING_BACKENDS:
        raise ValueError(f"unknown masking backend {backend!r}; valid: {', '.join(MASKING_BACKENDS)}")
    return backend


def kept_ids(ids_restore: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, N) inverse permutation -> (B, ``keep``) indices of the kept patches in the masking's output order
    (``ids_shuffle[:, :keep]``; one scatter, no sort)."""
    B, N = ids_restore.shape
    arange = torch.arange(N, device=ids_restore.device).expand(B, N)
    return torch.empty_like(ids_restore).scatter_(1, ids_restore, arange)[:, :keep]


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder that sees only the visible patches and a light decoder.

    ``forward(imgs, noise=None) -> (loss, pred, mask)`` with pred (B, N, p*p*3) and mask (B, N), 1 = masked.
    """

    def __init__(self, config: ModelConfig | None = None, mask: MaskConfig | None = None) -> None:
        super().__init__()
        cfg = config or ModelConfig()
        mask = mask or MaskConfig()
        validate_model(cfg)
        validate_mask(mask, (cfg.img_size // cfg.patch_size) ** 2)
        self.config = cfg
        self.mask_ratio = mask.ratio
        self.masking_backend = mask.backend
        self.mask_strategy = mask.strategy
        self.norm_pix_loss = cfg.norm_pix_loss
        self.encoder_mask_tokens = cfg.encoder_mask_tokens
        # "w/ [M]" needs every patch's token
        self.gather_first = cfg.patch_embed_order == "gather_first" and not cfg.encoder_mask_tokens
        D, Dd = cfg.embed_dim, cfg.decoder_embed_dim

        # ---- encoder
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        N = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, N + 1, D), requires_grad=False)  # fixed sin-cos
        if cfg.encoder_mask_tokens:  # the paper's "encoder w/ [M]" baseline only
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList(
            [Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.attention) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(D, eps=1e-6)

        # ---- decoder
        self.decoder_embed = nn.Linear(D, Dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, N + 1, Dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.attention) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size**2 * cfg.in_chans, bias=True)

        self.initialize_weights()

    # ------------------------------------------------------------------ init (official recipe)
    def initialize_weights(self) -> None:
        if self.pos_embed.device.type == "meta":
            return
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], grid).unsqueeze(0))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.encoder_mask_tokens:
            nn.init.normal_(self.encoder_mask_token, std=0.02)
        init_vit_weights(self)

    # ------------------------------------------------------------------ patches
    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), channels last within a patch (official order)."""
        p = self.patch_embed.patch_size
        B, C, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(B, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(B, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), the inverse of :meth:`patchify`."""
        p = self.patch_embed.patch_size
        C = self.config.in_chans
        B, N, _ = x.shape
        h = w = int(N**0.5)
        if h * w != N:
            raise ValueError(f"unpatchify needs a square number of patches, got {N}")
        x = x.reshape(B, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(B, C, h * p, w * p)

    # ------------------------------------------------------------------ masking
    def random_masking(
        self,
        x: torch.Tensor,
        mask_ratio: float,
        noise: torch.Tensor | None = None,
        seed: int | torch.Tensor | None = None,
        pos_embed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample masking with the configured strategy through the configured backend; returns (x_vis, mask,
        ids_restore).

        ``seed`` (an int, or an int64 tensor on the device) makes the mask a pure function of (seed, sample),
        the same on both backends: the training program passes one per micro batch so a resumed run masks
        exactly as the uninterrupted one. ``random`` draws its keys inside the fused kernel; ``block`` and
        ``grid`` draw sort keys (:mod:`fastmae.kernels.mask_patterns`) that the same gather then follows, as
        it follows given ``noise`` (which takes precedence over the strategy).
        """
        if noise is None and self.mask_strategy != "random":
            B, N = x.shape[0], x.shape[1]
            noise = pattern_keys(self.mask_strategy, B, N, num_kept(N, mask_ratio), seed=seed, device=x.device)
        backend = resolve_masking_backend(self.masking_backend, x.device)
        if backend == "triton":
            from .kernels.masking import random_masking

            return random_masking(x, mask_ratio, noise=noise, seed=seed, pos_embed=pos_embed)
        return random_masking_ref(x, mask_ratio, noise=noise, pos_embed=pos_embed, seed=seed)

    # ------------------------------------------------------------------ encoder / decoder
    def encode(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        noise: torch.Tensor | None = None,
        seed: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder on the visible tokens: returns latent (B, 1+K, D) (or (B, 1+N, D) with mask tokens),
        mask (B, N) and ids_restore (B, N)."""
        pos = self.pos_embed[:, 1:, :]  # (1, N, D)
        if self.gather_first:
            # visible pixel patches first, then the linear patch embedding on them only (+ their positions)
            patches = self.patch_embed.patches(imgs)  # (B, N, C*p*p)
            p_vis, mask, ids_restore = self.random_masking(patches, mask_ratio, noise=noise, seed=seed)
            ids_keep = kept_ids(ids_restore, p_vis.shape[1])  # (B, K)
            pos_vis = torch.gather(pos.expand(ids_keep.shape[0], -1, -1), 1,
                                   ids_keep.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
            x_vis = self.patch_embed.embed_patches(p_vis) + pos_vis  # (B, K, D)
        else:
            x = self.patch_embed(imgs)  # (B, N, D)
            x_vis, mask, ids_restore = self.random_masking(x, mask_ratio, noise=noise, seed=seed, pos_embed=pos)
        if self.encoder_mask_tokens:
            # "w/ [M]": every position stays, masked ones replaced by a learned token (+ position)
            m = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
            tokens = (x * (1 - m) + self.encoder_mask_token.to(x.dtype) * m) + pos  # (B, N, D)
        else:
            tokens = x_vis  # (B, K, D), position already added
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        h = torch.cat([cls, tokens], dim=1)  # (B, 1+T, D)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h), mask, ids_restore

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decoder over all N positions: returns pred (B, N, p*p*C)."""
        x = self.decoder_embed(latent)  # (B, 1+T, Dd)
        if not self.encoder_mask_tokens:
            B, N = ids_restore.shape
            mask_tokens = self.mask_token.to(x.dtype).expand(B, N + 1 - x.shape[1], -1)  # (B, N-K, Dd)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (B, N, Dd) in shuffled order
            x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
            x = torch.cat([x[:, :1, :], x_], dim=1)  # (B, 1+N, Dd)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # (B, 1+N, p*p*C)
        return x[:, 1:, :]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Regression target (B, N, p*p*C): patch pixels, per-patch normalised with ``norm_pix_loss``."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only."""
        target = self.target(imgs).float()
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self,
        imgs: torch.Tensor,
        noise: torch.Tensor | float | None = None,
        mask_ratio: float | None = None,
        mask_seed: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred (B, N, p*p*C), mask (B, N)).

        ``noise`` (B, N) fixes every sample's permutation as ``argsort(noise)`` like the official code.
        A float in its place is read as ``mask_ratio`` (the official ``forward(imgs, mask_ratio)``).
        """
        if isinstance(noise, (float, int)) and not isinstance(noise, bool):
            noise, mask_ratio = None, float(noise)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.encode(imgs, ratio, noise=noise, seed=mask_seed)
        pred = self.decode(latent, ids_restore)
        return self.loss(imgs, pred, mask), pred, mask

    # ------------------------------------------------------------------ helpers
    def tokens_per_encoder_pass(self, mask_ratio: float | None = None) -> int:
        """Tokens the encoder blocks see per image (cls included)."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        n = self.num_patches if self.encoder_mask_tokens else num_kept(self.num_patches, ratio)
        return n + 1

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay besides norms and biases (official: pos embed, cls, mask tokens)."""
        names = {"pos_embed", "decoder_pos_embed", "cls_token", "mask_token"}
        if self.encoder_mask_tokens:
            names.add("encoder_mask_token")
        return names
