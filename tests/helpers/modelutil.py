"""Models shared by test modules: the small official-like configuration of the checkpoint interop tests, and
pairs of debug MAEs with the same weights whose loss and gradients the performance toggle tests compare."""

from __future__ import annotations

import torch

import fastmae
from fastmae.config import ModelConfig

# an "official-like" small ViT: width 192 has a known head count (3, timm tiny), decoder 64 wide / 16 heads
OFFICIAL_LIKE = ModelConfig(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, decoder_embed_dim=64,
                            decoder_depth=1, decoder_num_heads=16, norm_pix_loss=False)


def loss_and_grads(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor):
    model.zero_grad()
    loss, _, _ = model(imgs, noise=noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def model_pair(**kw):
    """Two debug MAEs with the same weights (the second to change with a toggle, the first for reference)."""
    torch.manual_seed(0)
    a = fastmae.create_model("debug", **kw)
    b = fastmae.create_model("debug", **kw)
    b.load_state_dict(a.state_dict())
    return a, b
