"""An independent, straightforward PVT v1 detection backbone written from the official formulas, for tests.

Conv2d patch embedding and spatial reduction, explicit softmax attention, the official parameter names
(`patch_embed1.proj`, `block1.0.attn.sr`, `pos_embed4` with its cls entry ...). Slow and simple on purpose.
"""

import torch
import torch.nn.functional as F
from torch import nn


class RefAttention(nn.Module):
    def __init__(self, dim, heads, sr):
        super().__init__()
        self.heads, self.sr_ratio = heads, sr
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr, stride=sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.heads, C // self.heads).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
            x_ = self.sr(x_).reshape(B, C, -1).permute(0, 2, 1)
            x_ = self.norm(x_)
        else:
            x_ = x
        kv = self.kv(x_).reshape(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, sr):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x, H, W):
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch, cin, cout):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x):
        x = self.proj(x)
        H, W = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class RefPVT(nn.Module):
    """Detection-style PVT v1 with a classification head's parameters present (as in official checkpoints)."""

    def __init__(self, depths, dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), mlp=(8, 8, 4, 4), sr=(8, 4, 2, 1)):
        super().__init__()
        cins = (3, *dims[:3])
        patches = (4, 2, 2, 2)
        grids = (56, 28, 14, 7)
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", RefPatchEmbed(patches[i], cins[i], dims[i]))
            extra = 1 if i == 3 else 0
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.randn(1, grids[i] ** 2 + extra, dims[i]) * 0.5))
            setattr(self, f"block{i + 1}", nn.ModuleList(RefBlock(dims[i], heads[i], mlp[i], sr[i])
                                                         for _ in range(depths[i])))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dims[3]))
        self.norm = nn.LayerNorm(dims[3], eps=1e-6)
        self.head = nn.Linear(dims[3], 1000)
        self.grids = grids
        # Random, non-trivial LayerNorm affine parameters and biases so that every tensor matters.
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
                if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)

    def pos(self, i, H, W):
        p = getattr(self, f"pos_embed{i + 1}")
        if i == 3:
            p = p[:, 1:]
        g = self.grids[i]
        if (H, W) == (g, g):  # compare each stage with its own pretraining grid
            return p
        p = p.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        p = F.interpolate(p, size=(H, W), mode="bilinear", align_corners=False)
        return p.reshape(1, -1, H * W).permute(0, 2, 1)

    def forward(self, x):
        outs = []
        B = x.shape[0]
        for i in range(4):
            x, H, W = getattr(self, f"patch_embed{i + 1}")(x)
            x = x + self.pos(i, H, W)
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x, H, W)
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs
