"""A faithful small copy of the official PyTorch DiT (facebookresearch/DiT, models.py) for timing.

The architecture follows DiT's models.py: PatchEmbed, TimestepEmbedder (256-d sinusoid, MLP),
LabelEmbedder (class dropout via a null class), DiTBlock with adaLN-Zero, FinalLayer, fixed 2-D
sin-cos position embeddings and DiT's initialisation. The few timm layers DiT imports (PatchEmbed,
Attention, Mlp with tanh-GELU) are written here so the benchmark needs only torch.

`train_step` is DiT's training step reduced to what costs time: uniform t over 1000 steps, the
linear-beta forward process, the MSE on ε for the first half of the learned-σ output (DiT also
adds the VLB term on the σ half, a few elementwise ops), backward and AdamW (lr 1e-4, wd 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
  """timm's PatchEmbed: a p×p stride-p convolution, flattened to tokens."""

  def __init__(self, img_size, patch_size, in_chans, embed_dim):
    super().__init__()
    self.num_patches = (img_size // patch_size) ** 2
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
  """timm's Attention (fused qkv, scaled_dot_product_attention, output projection)."""

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = nn.functional.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  """timm's Mlp: fc1, GELU (tanh approximation in DiT), fc2."""

  def __init__(self, in_features, hidden_features):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden_features)
    self.act = nn.GELU(approximate="tanh")
    self.fc2 = nn.Linear(hidden_features, in_features)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
  def __init__(self, hidden_size, frequency_embedding_size=256):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True),
                             nn.SiLU(), nn.Linear(hidden_size, hidden_size, bias=True))
    self.frequency_embedding_size = frequency_embedding_size

  @staticmethod
  def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

  def forward(self, t):
    return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes, hidden_size, dropout_prob):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
    self.num_classes = num_classes
    self.dropout_prob = dropout_prob

  def forward(self, labels, train):
    if train and self.dropout_prob > 0:
      drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
      labels = torch.where(drop, self.num_classes, labels)
    return self.embedding_table(labels)


class DiTBlock(nn.Module):
  def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(hidden_size, num_heads)
    self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

  def forward(self, x, c):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        self.adaLN_modulation(c).chunk(6, dim=1))
    x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
    x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
    return x


class FinalLayer(nn.Module):
  def __init__(self, hidden_size, patch_size, out_channels):
    super().__init__()
    self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


def get_2d_sincos_pos_embed(embed_dim, grid_size):
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_h, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)

  def one_d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


class DiT(nn.Module):
  def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12,
               num_heads=6, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
               learn_sigma=True):
    super().__init__()
    self.in_channels = in_channels
    self.out_channels = in_channels * 2 if learn_sigma else in_channels
    self.patch_size = patch_size
    self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
    num_patches = self.x_embedder.num_patches
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
    self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio)
                                 for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
    self.initialize_weights()

  def initialize_weights(self):
    def _basic_init(module):
      if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
          nn.init.constant_(module.bias, 0)
    self.apply(_basic_init)
    pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches ** 0.5))
    self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
    w = self.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    nn.init.constant_(self.x_embedder.proj.bias, 0)
    nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
    for block in self.blocks:
      nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
      nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
    nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(self.final_layer.linear.weight, 0)
    nn.init.constant_(self.final_layer.linear.bias, 0)

  def unpatchify(self, x):
    c, p = self.out_channels, self.patch_size
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, h * p)

  def forward(self, x, t, y):
    x = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y, self.training)
    for block in self.blocks:
      x = block(x, c)
    return self.unpatchify(self.final_layer(x, c))


def make_dit(size="S", patch=2, image_size=32, channels=4, num_classes=1000) -> DiT:
  hidden, depth, heads = DIT_SIZES[size]
  return DiT(input_size=image_size, patch_size=patch, in_channels=channels, hidden_size=hidden,
             depth=depth, num_heads=heads, num_classes=num_classes)


def make_train_step(model: DiT, lr: float = 1e-4, autocast: bool = False):
  """DiT's train step (see the module docstring); returns `step(x, y) -> loss`. `autocast`: the
  forward (and so the backward) under `torch.autocast('cpu', torch.bfloat16)`, PyTorch's mixed
  precision (bf16 matmuls through oneDNN; parameters, optimizer and loss in float32)."""
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
  betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
  alphas_cumprod = torch.cumprod(1.0 - betas, 0).float()
  model.train()

  def step(x, y):
    t = torch.randint(0, 1000, (x.shape[0],))
    noise = torch.randn_like(x)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * noise
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      out = model(x_t, t, y)
    eps, _ = out.float().split(model.in_channels, dim=1)
    loss = ((eps - noise) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  return step


def serve(argv=None) -> None:
  """Worker mode for `throughput.py --torch`: builds the model and its train step, prints one JSON
  line of facts, then runs one step per 'step' line on stdin and answers with the step's wall
  and process-CPU seconds as a JSON line, until 'quit' or end of input. A separate process keeps
  PyTorch's allocator and OpenMP threads from slowing the JAX step timed after it."""
  import argparse
  import json
  import sys
  import time

  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="S")
  parser.add_argument("--patch", type=int, default=2)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=4)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--autocast", action="store_true")
  parser.add_argument("--tiny", action="store_true", help="hidden 32, depth 2 (smoke tests)")
  args = parser.parse_args(argv)
  torch.manual_seed(0)
  if args.tiny:
    model = DiT(input_size=args.image_size, patch_size=args.patch, in_channels=args.channels,
                hidden_size=32, depth=2, num_heads=2, num_classes=args.num_classes)
  else:
    model = make_dit(args.size, args.patch, args.image_size, args.channels, args.num_classes)
  step = make_train_step(model, autocast=args.autocast)
  x = torch.randn(args.batch, args.channels, args.image_size, args.image_size)
  y = torch.randint(0, args.num_classes, (args.batch,))
  print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                    "precision": "bfloat16 autocast" if args.autocast else "float32",
                    "omp_wait_policy": __import__("os").environ.get("OMP_WAIT_POLICY", "")}),
        flush=True)
  for line in sys.stdin:
    if line.strip() != "step":
      break
    start, start_cpu = time.perf_counter(), time.process_time()
    step(x, y)
    print(json.dumps({"wall_s": time.perf_counter() - start,
                      "cpu_s": time.process_time() - start_cpu}), flush=True)


if __name__ == "__main__":
  serve()
