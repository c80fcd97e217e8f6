"""Reconstruction pictures (the paper's Figures 2-4): one row per image, four panels (original, masked input,
reconstruction, reconstruction + visible patches), the mask fixed by ``--seed``:
``python -m fastmae.visualize --checkpoint mae.pth [--shards DIR | --folder DIR] [--num 4] [--out recon.png]``.
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fastmae.config import DataConfig, get_preset
from fastmae.data import build_loader
from fastmae.data.sample import bundled_sample_dir
from fastmae.interop import UnsafeCheckpointError, load_mae

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLANK = 128  # grey of masked patches (uint8, every channel)
MARGIN = 4
HEADER = 18
LINE = 14
TITLES = ("original", "masked input", "reconstruction", "reconstruction + visible")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Normalised (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    mean, std = _stats(x.device)
    pix = (x.float() * std + mean).clamp(0, 1) * 255
    return pix.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def reconstruct(model: torch.nn.Module, imgs: torch.Tensor, mask_ratio: float, seed: int = 0) -> dict[str, np.ndarray]:
    """The four panels of each image as uint8 (B, H, W, 3) arrays, and the mask (B, N) (1 = masked)."""
    model.eval()
    B = imgs.shape[0]
    N = model.num_patches
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(B, N, generator=g).to(imgs.device)  # the permutation: argsort(noise)
    latent, mask, ids_restore = model.encode(imgs, mask_ratio, noise=noise)
    pred = model.decode(latent, ids_restore).float()  # (B, N, p*p*3)
    if model.norm_pix_loss:  # undo the per-patch normalisation with the original patch's statistics
        target = model.patchify(imgs.float())
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    p2c = pred.shape[-1]
    mask_px = model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, p2c))  # (B, 3, H, W), 1 = masked
    recon = model.unpatchify(pred)  # (B, 3, H, W)
    pasted = recon * mask_px + imgs.float() * (1 - mask_px)
    original = to_uint8(imgs)
    masked = original.copy()
    masked[mask_px[:, 0].bool().cpu().numpy()] = BLANK
    return {"original": original, "masked": masked, "reconstruction": to_uint8(recon),
            "pasted": to_uint8(pasted), "mask": mask.cpu().numpy()}


def layout(num: int, panel: int, caption_lines: int) -> tuple[int, int, list[list[tuple[int, int]]]]:
    """(width, height, top-left corner of every panel [row][col]) of a grid with ``num`` rows."""
    width = 4 * panel + 5 * MARGIN
    height = HEADER + num * panel + (num + 1) * MARGIN + caption_lines * LINE
    boxes = [[(MARGIN + c * (panel + MARGIN), HEADER + MARGIN + r * (panel + MARGIN)) for c in range(4)]
             for r in range(num)]
    return width, height, boxes


def caption_for(norm_pix: bool, mask_ratio: float, seed: int, name: str) -> list[str]:
    lines = [f"{name} | mask ratio {mask_ratio:g} | seed {seed}"]
    if norm_pix:
        lines.append("norm_pix_loss model: prediction un-normalised with each patch's mean/var of the original")
    return lines


def render(panels: dict[str, np.ndarray], scale: int, caption: list[str]) -> Image.Image:
    """The PNG grid; panels are enlarged ``scale`` times with nearest-neighbour (patch edges stay sharp)."""
    order = ("original", "masked", "reconstruction", "pasted")
    num, size = panels["original"].shape[:2]
    panel = size * scale
    width, height, boxes = layout(num, panel, len(caption))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(TITLES):
        draw.text((boxes[0][c][0], 3), title, fill=(0, 0, 0))
    for r in range(num):
        for c, key in enumerate(order):
            im = Image.fromarray(panels[key][r])
            if scale != 1:
                im = im.resize((panel, panel), Image.Resampling.NEAREST)
            canvas.paste(im, boxes[r][c])
    y = height - len(caption) * LINE
    for line in caption:
        draw.text((MARGIN, y), line, fill=(0, 0, 0))
        y += LINE
    return canvas


def load_folder(folder: str | Path, img_size: int, num: int) -> torch.Tensor:
    """First ``num`` images of a folder (sorted): shorter side to ``img_size``, centre crop, normalised."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)[:num]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = img_size / min(w, h)
            im = im.resize((max(img_size, round(w * s)), max(img_size, round(h * s))), Image.Resampling.BICUBIC)
            w, h = im.size
            left, top = (w - img_size) // 2, (h - img_size) // 2
            arr = np.asarray(im.crop((left, top, left + img_size, top + img_size)), dtype=np.float32) / 255
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    x = torch.stack(out)
    mean, std = _stats(x.device)
    return (x - mean) / std


def load_shards(shards: str, img_size: int, num: int) -> torch.Tensor:
    """First ``num`` images of a shard set in eval order (resize + centre crop), normalised."""
    data = DataConfig(backend="torch", shards=shards, batch_size=num, num_workers=0)
    loader = build_loader(data, img_size=img_size, mode="eval")
    loader.set_epoch(0)
    imgs, _ = next(iter(loader))
    return imgs.float()[:num]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmae.visualize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True,
                    help="MAE with decoder: fastmae export/run directory or official mae_visualize_vit_*.pth")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--shards", default="", help="shards to take images from ('' = the bundled sample's val)")
    src.add_argument("--folder", default="", help="a folder of image files instead of shards")
    ap.add_argument("--num", type=int, default=4, help="number of images (rows)")
    ap.add_argument("--mask_ratio", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=0, help="panel enlargement (0 = up to ~224 px per panel)")
    ap.add_argument("--norm_pix_loss", choices=("auto", "true", "false"), default="auto",
                    help="whether the model predicts per-patch normalised pixels (auto: from the checkpoint's "
                         "config; official mae_visualize_* files: false)")
    ap.add_argument("--preset", default="mae_vit_large_patch16", help="architecture for unusual head counts")
    ap.add_argument("--out", default="reconstruction.png")
    args = ap.parse_args(argv)
    if not 0.0 <= args.mask_ratio < 1.0:
        print(f"fastmae.visualize: --mask_ratio={args.mask_ratio} must lie in [0, 1)", file=sys.stderr)
        return 2
    npl = None if args.norm_pix_loss == "auto" else args.norm_pix_loss == "true"
    try:
        model, _ = load_mae(args.checkpoint, norm_pix_loss=npl, base=get_preset(args.preset).model)
        model.masking_backend = "torch"  # the reference: the same picture on every machine
        size = model.config.img_size
        if args.folder:
            imgs = load_folder(args.folder, size, args.num)
        else:
            shards = args.shards
            if not shards:
                shards = str(bundled_sample_dir("val"))
            imgs = load_shards(shards, size, args.num)
    except (UnsafeCheckpointError, ValueError, FileNotFoundError) as e:
        print(f"fastmae.visualize: {e}", file=sys.stderr)
        return 1
    panels = reconstruct(model, imgs, args.mask_ratio, args.seed)
    scale = args.scale or max(1, 224 // size)
    caption = caption_for(model.norm_pix_loss, args.mask_ratio, args.seed, Path(args.checkpoint).name)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render(panels, scale, caption).save(out)
    print(f"wrote {out} ({len(imgs)} images, {size}px x{scale}, mask ratio {args.mask_ratio})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
