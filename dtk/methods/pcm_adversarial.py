"""PCM's adversarial consistency loss (Wang et al., NeurIPS 2024, §3.4): a second player for the engine.

The student's edge output (fake) and a real latent are re-noised to the same
s' ~ U[s, s + span) with the same noise, and small discriminator heads on the
frozen teacher's block features judge them (hinge loss). The generator's term
joins the student's loss; the discriminator's update runs in the engine's loop
after the student's, over every micro-batch the student saw
(``dtk.train.engine``: accumulation, NaN guard and mixed precision as for the
student).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dtk.diffusion.denoiser import Denoiser

NUM_TRAIN_TIMESTEPS = 1000


class DiscriminatorHead(nn.Module):
    """conv-GN-LeakyReLU, a second one with a residual around it, then a 1×1 conv to one logit channel
    (PCM's reference head)."""

    def __init__(self, c: int):
        super().__init__()
        groups = math.gcd(32, c)
        self.conv1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c), nn.LeakyReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c), nn.LeakyReLU())
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = self.conv1(f)
        return self.out(self.conv2(h) + h)


class DiscriminatorHeads(nn.Module):
    """Small trainable heads on the frozen teacher UNet's down/mid/up block features, ``per_feature`` of them
    on each (4, as PCM's reference code): one logit map each, judged position by position (a patch
    discriminator at every feature scale)."""

    def __init__(self, channels: list[int], per_feature: int = 4):
        super().__init__()
        self.heads = nn.ModuleList(nn.ModuleList(DiscriminatorHead(c) for _ in range(per_feature)) for c in channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """``per_feature`` [B, 1, h, w] logit maps per feature."""
        return [h(f).float() for heads, f in zip(self.heads, features) for h in heads]


def block_features(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond) -> list[torch.Tensor]:
    """Outputs of every down block, the mid block and every up block of the denoiser's UNet at (x, t)."""
    base = getattr(denoiser.net, "module", denoiser.net)
    blocks = [*base.down_blocks, base.mid_block, *base.up_blocks]
    found: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: found.append((o[0] if isinstance(o, tuple) else o).float()))
             for b in blocks]
    try:
        denoiser.output(x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    return found


def feature_channels(unet) -> list[int]:
    c = unet.config.block_out_channels
    return [*c, c[-1], *reversed(c)]


def judging_timesteps(rng, s: torch.Tensor, span: int) -> torch.Tensor:
    """Where the discriminator judges each example: s' ~ U{s, …, s + span − 1}, at most T − 1."""
    return (s + (rng.rand() * span).long()).clamp(max=NUM_TRAIN_TIMESTEPS - 1)


def hinge_d_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Hinge loss per position, averaged over positions, then over heads: 2 for an undecided D."""
    return torch.stack([torch.relu(1 - r).mean() + torch.relu(1 + f).mean() for r, f in zip(real, fake)]).mean()


def hinge_g_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    """The generator's hinge: push every position's fake logit up to the margin (no reward beyond it)."""
    return torch.stack([torch.relu(1 - f).mean() for f in fake]).mean()


def judged_pair(schedule, fake_edge, real_edge, s, s_to, noise, real_is_data: bool):
    """Fake and real re-noised from their edges to s' with the same noise; real data starts from ᾱ = 1
    (t = −1)."""
    fake = schedule.renoise(fake_edge, s, s_to, noise)
    real = schedule.renoise(real_edge, torch.full_like(s, -1) if real_is_data else s, s_to, noise)
    return fake, real


class AdversarialTerm:
    """The discriminator as the engine's second player: ``generator_loss`` inside the student's loss records
    what was judged; the engine then calls ``loss`` once per recorded micro-batch and steps ``optimizer``."""

    max_grad_norm = math.inf   # PCM's reference does not clip the discriminator: the norm is only checked
    log_name = "d_loss"

    def __init__(self, heads: DiscriminatorHeads, lr: float):
        self.module = heads
        self.optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, betas=(0.0, 0.999))
        self.teacher: Denoiser | None = None
        self._pending: list[tuple] = []   # one (fake, real, s', cond) per micro-batch of the step

    def prepare(self, accelerator) -> None:
        self.module, self.optimizer = accelerator.prepare(self.module, self.optimizer)

    def generator_loss(self, fake: torch.Tensor, real: torch.Tensor, s_to: torch.Tensor, cond) -> torch.Tensor:
        """The student's adversarial term (the heads frozen for it); the pair is kept for the discriminator."""
        self.module.requires_grad_(False)
        g = hinge_g_loss(self.module(block_features(self.teacher, fake, s_to, cond)))
        self.module.requires_grad_(True)
        self._pending.append((fake.detach(), real.detach(), s_to, cond))
        return g

    def take(self) -> list[tuple]:
        pending, self._pending = self._pending, []
        return pending

    def loss(self, item: tuple) -> torch.Tensor:
        """The discriminator's hinge loss on one recorded micro-batch (run under the engine's autocast)."""
        fake, real, s_to, cond = item
        with torch.no_grad():   # the frozen teacher's features
            f_fake = block_features(self.teacher, fake, s_to, cond)
            f_real = block_features(self.teacher, real, s_to, cond)
        return hinge_d_loss(self.module(f_real), self.module(f_fake))

    def state_dict(self) -> dict:
        heads = getattr(self.module, "module", self.module)
        return {"heads": heads.state_dict(), "d_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        getattr(self.module, "module", self.module).load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["d_optimizer"])
