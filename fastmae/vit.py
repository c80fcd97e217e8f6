"""The ViT classifier of fine-tuning and linear probing: the MAE encoder plus a pooled head, in timm's
``VisionTransformer`` parameter names, so MAE checkpoints load their encoder directly and a fine-tuned model's
state dict is a timm ``vit_*_patch*_224`` one. See docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import Block, PatchEmbed, init_vit_weights, sincos_2d

# keys of an MAE state dict that belong to the decoder (or the masking) and never to the classifier
DECODER_PREFIXES = ("decoder_", "mask_token", "encoder_mask_token")


class DropPath(nn.Module):
    """Stochastic depth per sample: zero a residual branch with probability ``p`` and scale the kept ones
    by ``1/(1-p)``. The same arithmetic and random draws as timm's ``DropPath`` (``scale_by_keep=True``),
    written here so that the model does not need timm.

    Under ``torch.compile`` the keep probability is read from a tensor (a buffer, not in the state dict): a float
    would be a constant of the graph, and the blocks of a linear drop-path schedule, one rate each, would each
    compile a graph of their own."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("keep", torch.tensor(1.0), persistent=False)
        self.p = p

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = float(value)
        self.active = self._p > 0.0  # a bool: compiled code branches on it without guarding on the rate
        self.keep.fill_(1.0 - self._p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
        if torch.compiler.is_compiling():
            keep = self.keep.to(x.dtype)
            return x * (torch.rand(shape, device=x.device, dtype=x.dtype) < keep) / keep
        keep = 1.0 - self._p
        mask = x.new_empty(shape).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ClassifierBlock(Block):
    """:class:`fastmae.layers.Block` with drop path on both residual branches (timm ``drop_path1/2``;
    no parameters, so the state dict is the Block's)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attention: str = "auto",
                 drop_path: float = 0.0) -> None:
        super().__init__(dim, num_heads, mlp_ratio, attention)
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT classifier with timm names. ``forward(imgs (B,3,H,W)) -> logits (B, num_classes)``.

    ``head_bn=True`` puts ``BatchNorm1d(affine=False, eps=1e-6)`` before the linear head (linear probing,
    official ``main_linprobe.py``: the head is then ``head.0`` (BN) and ``head.1`` (linear)).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        global_pool: bool = True,
        drop_path_rate: float = 0.0,
        attention: str = "auto",
        head_bn: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.head_bn = head_bn
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # learnable in fine-tuning (timm / official), initialised from the checkpoint's sin-cos values
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, self.patch_embed.grid_size).unsqueeze(0))
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]  # timm: linear in depth
        self.blocks = nn.ModuleList(
            [ClassifierBlock(embed_dim, num_heads, mlp_ratio, attention, dpr[i]) for i in range(depth)]
        )
        # timm layout: global_pool='avg' -> norm is Identity and fc_norm a LayerNorm; 'token' -> the reverse
        self.norm = nn.Identity() if global_pool else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool else nn.Identity()
        linear: nn.Module = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if head_bn:
            self.head: nn.Module = nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), linear)
        else:
            self.head = linear
        # partial fine-tuning (:meth:`freeze_prefix`): whether the embeddings are frozen, and how many leading
        # blocks with them; that prefix runs without a backward graph
        self.prefix_frozen = False
        self.frozen_blocks = 0
        # set by fastmae.parallelize for compiled blocks under ZeRO-3: the prefix's output (still without history)
        # requires grad, as DeepSpeed's hooks of a compiled block need
        self.prefix_output_requires_grad = False
        self._init_weights()

    # ------------------------------------------------------------------ init
    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        init_vit_weights(self)

    @property
    def head_linear(self) -> nn.Module:
        """The linear layer of the head (``head`` or ``head.1`` with BatchNorm)."""
        return self.head[1] if self.head_bn else self.head

    def init_head(self, std: float) -> None:
        """Official re-initialisation of the classifier after loading: weight ~ trunc_normal(std), bias 0
        (2e-5 for fine-tuning, 0.01 for linear probing as in MoCo v3)."""
        lin = self.head_linear
        if isinstance(lin, nn.Linear):
            nn.init.trunc_normal_(lin.weight, std=std)  # bounds +-2 absolute, as timm's (i.e. untruncated)
            nn.init.zeros_(lin.bias)

    def freeze_prefix(self, trainable_blocks: int) -> int:
        """Partial fine-tuning (paper Fig. 9): train only the last ``trainable_blocks`` blocks, ``norm`` /
        ``fc_norm`` and the head (0 = the head and the norm only). The patch embedding, cls token, position
        embedding and the leading ``depth - trainable_blocks`` blocks get ``requires_grad=False`` and run under
        ``torch.no_grad()`` (:meth:`forward_prefix`), with drop path off in those blocks (a frozen block is a
        fixed feature extractor; the trainable blocks keep their rates of the linear schedule). Every weight
        stays in the state dict. Returns the number of trainable parameters."""
        depth = len(self.blocks)
        if not 0 <= trainable_blocks <= depth:
            raise ValueError(f"trainable_blocks={trainable_blocks}: valid are 0 to {depth} (the model's depth)")
        self.prefix_frozen, self.frozen_blocks = True, depth - trainable_blocks
        frozen: list[nn.Parameter] = [self.cls_token, self.pos_embed, *self.patch_embed.parameters()]
        for blk in self.blocks[: self.frozen_blocks]:
            frozen.extend(blk.parameters())
            blk.drop_path1.p = blk.drop_path2.p = 0.0
        for p in frozen:
            p.requires_grad_(False)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ forward
    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1+N, D): patch tokens after the cls token, plus the position embedding."""
        x = self.patch_embed(imgs)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1+N, D)

    def forward_prefix(self, imgs: torch.Tensor) -> torch.Tensor:
        """The embeddings and the frozen leading blocks: (B, 1+N, D). Under partial fine-tuning this runs
        under ``torch.no_grad()``: nothing before the first trainable block needs a gradient, so no backward
        graph (and none of its saved activations) is built for it."""
        frozen = torch.no_grad() if self.prefix_frozen else contextlib.nullcontext()
        with frozen:
            x = self.embed(imgs)
            for blk in self.blocks[: self.frozen_blocks]:
                x = blk(x)
        if self.prefix_frozen and self.prefix_output_requires_grad:
            x.requires_grad_()  # a leaf: gradients stop here all the same
        return x

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """All tokens after the encoder (and ``norm`` with cls-token pooling): (B, 1+N, D)."""
        x = self.forward_prefix(imgs)
        for blk in self.blocks[self.frozen_blocks:]:
            x = blk(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, D) -> (B, D): mean of the patch tokens + fc_norm, or the cls token."""
        if self.global_pool:
            return self.fc_norm(tokens[:, 1:, :].mean(dim=1))
        return tokens[:, 0]

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(tokens))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(imgs))

    def no_weight_decay(self) -> set[str]:
        """Besides norms and biases (official / timm ``no_weight_decay``)."""
        return {"pos_embed", "cls_token"}

    # ------------------------------------------------------------------ loading
    def load_encoder(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Load encoder weights from an MAE, encoder or classifier state dict (official/timm names).

        Decoder keys are ignored, ``pos_embed`` is resized (bicubic, as the official
        ``interpolate_pos_embed``) when the image size differs, and a head of another shape or a ``norm``
        the pooling does not use is left out. Returns the keys of this model that were *not* loaded.
        """
        own = self.state_dict()
        sd = {k: v for k, v in state_dict.items() if not k.startswith(DECODER_PREFIXES)}
        if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], self.patch_embed.grid_size)
        usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        wrong = [k for k, v in sd.items()
                 if k in own and own[k].shape != v.shape and not k.startswith("head")]
        if wrong:
            raise ValueError(f"checkpoint tensors do not fit this ViT: {wrong[:5]} (shape mismatch); "
                             "check the architecture (preset) against the checkpoint")
        missing = [k for k in own if k not in usable]
        encoder = ("blocks.", "patch_embed.", "cls_token", "pos_embed")
        enc_missing = [k for k in missing if k.startswith(encoder)]
        if enc_missing:
            raise ValueError(f"checkpoint lacks encoder weights {enc_missing[:5]}: not a ViT/MAE checkpoint?")
        self.load_state_dict(usable, strict=False)
        return missing


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1+n*n, D) -> (1, 1+grid*grid, D): bicubic resize of the patch positions, cls row kept."""
    cls, patches = pos[:, :1], pos[:, 1:]
    n = int(math.isqrt(patches.shape[1]))
    if n * n != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid")
    D = pos.shape[-1]
    p = patches.reshape(1, n, n, D).permute(0, 3, 1, 2).float()  # (1, D, n, n)
    p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False)
    p = p.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(pos.dtype)
    return torch.cat([cls, p], dim=1)


def build_classifier(cfg: ModelConfig, num_classes: int, global_pool: bool = True, drop_path: float = 0.0,
                     head_bn: bool = False) -> VisionTransformer:
    """The classifier over the encoder that ``cfg`` (an MAE :class:`ModelConfig`) describes."""
    return VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, num_classes=num_classes,
        global_pool=global_pool, drop_path_rate=drop_path, attention=cfg.attention, head_bn=head_bn,
    )


# ----------------------------------------------------------------------------- layer-wise lr decay


def layer_id(name: str, num_layers: int) -> int:
    """Layer of a parameter for layer-wise lr decay (BEiT / official ``get_layer_id_for_vit``):
    0 for the embeddings, i+1 for block i, ``num_layers`` (= depth + 1) for the norms and the head."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def layer_decay_scale(name: str, depth: int, decay: float) -> float:
    """lr multiplier ``decay ** (depth + 1 - layer_id)``: 1 for the head, ``decay**(depth+1)`` for the
    patch embedding."""
    num_layers = depth + 1
    return decay ** (num_layers - layer_id(name, num_layers))
