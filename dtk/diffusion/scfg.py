"""S-CFG: semantic-aware classifier-free guidance (Shen, Song, Xue, Wang, Liu, "Rethinking the Spatial
Inconsistency in Classifier-Free Diffusion Guidance", CVPR 2024, arXiv 2404.05384).

CFG scales the guidance δ = ε_c − ε_u by one number s over the whole latent; S-CFG gives every semantic
region of the latent its own multiplier, so that each region is guided as strongly as the foreground:

    ε̂ = ε_u + s · M ⊙ (ε_c − ε_u)                                              (S-CFG)

with M a per-pixel map (M ≡ 1 is plain CFG). At every step, from the same batched UNet call that gives
ε_u and ε_c:

1. Attention maps. At each chosen transformer block ℓ (the UNet levels at 1/4 and 1/8 of the latent
   resolution — SD1.5 at 512²: 16×16 and 8×8, SDXL at 1024²: 32×32), the head-averaged cross-attention
   probabilities C_ℓ ∈ R^{N×T} (N pixels, T tokens) and self-attention probabilities S_ℓ ∈ R^{N×N} of the
   block's attn2 and attn1.
2. Self-attention completion (an SSGC-style multi-hop smoothing): C̃_ℓ = ¼(S_ℓ + 3 S_ℓ²) C_ℓ.
   (The official code's loop meant as SSGC's ¼ Σ_{k=1..4} S^k multiplies S·S each time, so it computes
   ¼(S + 3S²); we keep what the published results were made with.)
3. Per layer, C̃_ℓ as T maps on the block's grid, bilinearly resized to the finest chosen grid, smoothed
   (3×3 Gaussian, reflect padding), and each token's map renormalised by its spatial mean:
   A_{ℓ,k} = C̃_{ℓ,k} / mean(C̃_{ℓ,k}). The layers' maps are averaged: A_k = mean_ℓ A_{ℓ,k}.
4. Regions (conditional branch): every pixel belongs to the token of largest A_k, over every token
   position of the prompt (start token, words, end and padding tokens, as the official code; ``token_mask``
   can restrict them): R_k = {p : k = argmax_j A_j(p)}.
5. Foreground (unconditional branch, as the official code): the start token's map against the sum of all
   others, each renormalised and layer-averaged as in 3; foreground F = {p : Σ_{k≥1} Â_k(p) > Â_0(p)}.
6. Renormalisation at the latent resolution (masks upsampled nearest), with ‖δ(p)‖ the channel norm of δ:
   γ_k = mean_{p∈F} ‖δ(p)‖ / mean_{p∈R_k} ‖δ(p)‖, so that mean_{p∈R_k} ‖γ_k δ(p)‖ = mean_{p∈F} ‖δ(p)‖
   for every region: the guidance degree is uniform, at the foreground's level. M(p) = γ_k for p ∈ R_k.
7. As the official SD code: M clamped to [0.8, 3], and to s·M ≤ 15, then smoothed by the same 3×3 kernel.

It applies at every step. Where the paper is silent the official code (github.com/SmilesDZgk/S-CFG) is
followed; our own choices: an empty foreground (an SDXL base model encodes the empty negative prompt to
zeros, so its unconditional attention is uniform and names no foreground) takes the whole latent as the
reference (as the official DeepFloyd-IF stage-II code does) instead of giving every region γ = 0; pixels
tied between tokens go to the first; models whose UNet has no attention at 1/4 or 1/8 of the latent (the
tiny test models) use their coarsest attention level.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
import torch.nn.functional as F

FACTORS = (4, 8)          # the latent's downsampling factors whose attention maps are used (official R = 4)
CLAMP = (0.8, 3.0)        # official SD code: M ∈ [0.8, 3]
MAX_GUIDED = 15.0         # official: s·M ≤ 15
EPS = 1e-8


# ---------------------------------------------------------------------------
# The maths: attention maps → per-pixel multiplier M


def smoothing_kernel(device=None) -> torch.Tensor:
    """The official 3×3 "Gaussian" (kernel_size 3, σ = 0.5), as its GaussianSmoothing builds it:
    exp(−((x−μ)/(2σ))²) = exp(−d²) per axis, normalised to sum 1. Shape [1, 1, 3, 3]."""
    d = torch.tensor([-1.0, 0.0, 1.0], device=device)
    k = torch.exp(-d ** 2)
    k2 = torch.outer(k, k)
    return (k2 / k2.sum()).view(1, 1, 3, 3)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """Every channel of x [B, C, H, W] smoothed by the 3×3 kernel, reflect padding (replicate on a side of
    one pixel, which reflection cannot pad); float32."""
    b, c, h, w = x.shape
    mode = "reflect" if h > 1 and w > 1 else "replicate"
    y = F.pad(x.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode=mode)
    return F.conv2d(y, smoothing_kernel(x.device)).view(b, c, h, w)


def complete(cross: torch.Tensor, self_attn: torch.Tensor | None) -> torch.Tensor:
    """Self-attention completion of cross-attention maps [N, Q, T] by self-attention [N, Q, Q]:
    ¼(S + 3S²)·C, computed as ¼(S·C + 3·S·(S·C)) (no Q×Q×Q product)."""
    if self_attn is None:
        return cross
    sc = self_attn @ cross
    return (sc + 3 * (self_attn @ sc)) / 4


def layer_maps(cross: torch.Tensor, self_attn: torch.Tensor | None, size: tuple[int, int],
               out_size: tuple[int, int]) -> torch.Tensor:
    """One layer's completed maps [N, T, *out_size] (steps 2–3 before the renormalisation): completed,
    laid out on the layer's grid ``size``, resized bilinearly to ``out_size`` and smoothed."""
    n, q, t = cross.shape
    h, w = size
    if q != h * w:
        raise ValueError(f"attention over {q} positions does not fit a {h}x{w} grid")
    maps = complete(cross.float(), None if self_attn is None else self_attn.float())
    maps = maps.transpose(1, 2).reshape(n, t, h, w)
    if (h, w) != tuple(out_size):
        maps = F.interpolate(maps, size=tuple(out_size), mode="bilinear", align_corners=False)
    return smooth(maps)


def spatial_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its spatial mean (the paper's renormalisation of cross-attention)."""
    return maps / (maps.mean(dim=(2, 3), keepdim=True) + EPS)


class MapAverage:
    """Steps 3–5 over layers as they come: the layer average of the conditional branch's renormalised token
    maps, and of the unconditional branch's renormalised (start token, all others) pair. Batches are
    [uncond; cond] (CFG's order), 2B rows."""

    def __init__(self, out_size: tuple[int, int]):
        self.out_size = tuple(out_size)
        self.tokens = None   # [B, T, h, w], summed over layers
        self.fore = None     # [B, 2, h, w]
        self.layers = 0

    def add(self, cross: torch.Tensor, self_attn: torch.Tensor | None, size: tuple[int, int]) -> None:
        cross_u, cross_c = cross.chunk(2)
        self_u, self_c = (None, None) if self_attn is None else self_attn.chunk(2)
        tokens = spatial_normalise(layer_maps(cross_c, self_c, size, self.out_size))
        # completion, resizing and smoothing are linear: the sum of the other tokens' maps is the map of
        # their summed attention
        pair = torch.stack([cross_u[..., 0], cross_u[..., 1:].sum(-1)], dim=-1)
        fore = spatial_normalise(layer_maps(pair, self_u, size, self.out_size))
        self.tokens = tokens if self.tokens is None else self.tokens + tokens
        self.fore = fore if self.fore is None else self.fore + fore
        self.layers += 1

    def scales(self, delta: torch.Tensor, guidance: float, token_mask: torch.Tensor | None = None,
               **kwargs) -> torch.Tensor:
        if not self.layers:
            raise RuntimeError("S-CFG: no attention maps were captured")
        tokens, fore = self.tokens / self.layers, self.fore / self.layers
        return renormalised_scales(region_masks(tokens, token_mask), foreground_mask(fore), delta, guidance,
                                   **kwargs)


def region_masks(token_maps: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One-hot regions [B, T, h, w] from averaged token maps [B, T, h, w]: each pixel to its largest token
    (first on a tie); ``token_mask`` ([T] or [B, T], True = may own pixels) leaves tokens out."""
    scores = token_maps
    if token_mask is not None:
        keep = token_mask.to(device=scores.device, dtype=torch.bool)
        keep = keep.view(1, -1, 1, 1) if keep.dim() == 1 else keep[:, :, None, None]
        scores = scores.masked_fill(~keep, float("-inf"))
    owner = scores.argmax(dim=1)
    return F.one_hot(owner, token_maps.shape[1]).permute(0, 3, 1, 2).to(token_maps.dtype)


def foreground_mask(fore_maps: torch.Tensor) -> torch.Tensor:
    """[B, 1, h, w]: 1 where the other tokens' renormalised map beats the start token's (strictly: a tie is
    background, as the official code's ``== max`` test of the start token)."""
    return (fore_maps[:, 1:2] > fore_maps[:, 0:1]).to(fore_maps.dtype)


def renormalised_scales(regions: torch.Tensor, foreground: torch.Tensor, delta: torch.Tensor, guidance: float,
                        clamp: tuple[float, float] | None = CLAMP, max_guided: float | None = MAX_GUIDED,
                        smoothing: bool = True) -> torch.Tensor:
    """Step 6–7: the per-pixel multiplier M [B, 1, H, W] (float32) on δ = ε_c − ε_u [B, C, H, W].

    ``regions`` [B, K, h, w] (one-hot or any partition) and ``foreground`` [B, 1, h, w] are upsampled
    (nearest) to δ's grid; γ_k = mean_F ‖δ‖ / mean_{R_k} ‖δ‖ (an empty foreground: the whole latent is the
    reference); M = Σ_k γ_k R_k. With ``clamp=None, max_guided=None, smoothing=False`` every region's mean
    ‖M δ‖ is exactly the reference's."""
    size = delta.shape[-2:]
    regions = F.interpolate(regions.float(), size=size, mode="nearest")
    foreground = F.interpolate(foreground.float(), size=size, mode="nearest")
    norm = delta.float().norm(dim=1, keepdim=True)                                   # ‖δ(p)‖, [B, 1, H, W]
    area = regions.sum(dim=(2, 3))                                                   # [B, K]
    region_mean = (norm * regions).sum(dim=(2, 3)) / (area + EPS)                    # [B, K]
    fore_area = foreground.sum(dim=(2, 3))                                           # [B, 1]
    reference = torch.where(fore_area > 0, (norm * foreground).sum(dim=(2, 3)) / (fore_area + EPS),
                            norm.mean(dim=(2, 3)))                                   # [B, 1]
    gamma = reference * (area > 0) / (region_mean + EPS)                             # [B, K]
    m = (gamma[:, :, None, None] * regions).sum(dim=1, keepdim=True)                 # [B, 1, H, W]
    if clamp is not None:
        m = m.clamp(*clamp)
    if max_guided is not None:
        m = m.clamp(max=max_guided / guidance)
    if smoothing:
        m = smooth(m)
    return m


def scfg_scales(cross_maps: list[torch.Tensor], self_maps: list[torch.Tensor | None], delta: torch.Tensor,
                token_mask: torch.Tensor | None = None, *, sizes: list[tuple[int, int]], guidance: float,
                **kwargs) -> torch.Tensor:
    """S-CFG's per-pixel guidance multiplier M [B, 1, H, W] (the module docstring's steps 2–7).

    ``cross_maps[ℓ]`` [2B, Q_ℓ, T] and ``self_maps[ℓ]`` [2B, Q_ℓ, Q_ℓ] (or None: no completion) are layer ℓ's
    head-averaged attention probabilities, rows [unconditional; conditional] as in one batched CFG call,
    on a grid ``sizes[ℓ]`` (h, w) with h·w = Q_ℓ; δ = ε_c − ε_u [B, C, H, W]. The finest grid is the
    regions' grid. ``kwargs``: ``renormalised_scales``'s clamp, max_guided, smoothing."""
    finest = max(sizes, key=lambda s: s[0] * s[1])
    average = MapAverage(finest)
    for cross, self_attn, size in zip(cross_maps, self_maps, sizes, strict=True):
        average.add(cross, self_attn, size)
    return average.scales(delta, guidance, token_mask, **kwargs)


def scfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float, m: torch.Tensor) -> torch.Tensor:
    """ε_u + s·(M ⊙ (ε_c − ε_u)), in the outputs' dtype; M ≡ 1 gives ``denoiser.cfg``'s result bit for bit."""
    delta = cond - uncond
    return uncond + scale * (m.to(delta.dtype) * delta)


# ---------------------------------------------------------------------------
# Capturing the attention maps of a diffusers UNet2DConditionModel


def attention_levels(unet) -> list[tuple[str, object, object, int]]:
    """Every transformer block of the UNet with a self-attention ``attn1`` and a cross-attention ``attn2``:
    (name, attn1, attn2, level), the level the block runs at (the latent divided by 2^level)."""
    down = len(getattr(unet, "down_blocks", []))
    up = len(getattr(unet, "up_blocks", []))
    found = []
    for name, module in unet.named_modules():
        attn1, attn2 = getattr(module, "attn1", None), getattr(module, "attn2", None)
        if attn1 is None or attn2 is None or not getattr(attn2, "is_cross_attention", False):
            continue
        if getattr(attn1, "is_cross_attention", False):
            attn1 = None   # only_cross_attention blocks: no self-attention to complete with
        if m := re.match(r"down_blocks\.(\d+)\.", name):
            level = int(m.group(1))
        elif name.startswith("mid_block."):
            level = down - 1
        elif m := re.match(r"up_blocks\.(\d+)\.", name):
            level = up - 1 - int(m.group(1))
        else:
            continue
        found.append((name, attn1, attn2, level))
    return found


def chosen_levels(levels: list[int], factors=FACTORS) -> set[int]:
    """The levels at the latent's 1/4 and 1/8 (official), else the coarsest level with attention."""
    chosen = {lv for lv in levels if 2 ** lv in factors}
    return chosen or ({max(levels)} if levels else set())


def grid_at(size: tuple[int, int], level: int) -> tuple[int, int]:
    """The UNet's grid at a level: each downsampler (3×3, stride 2, padding 1) gives ⌈n/2⌉."""
    h, w = size
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def head_mean_probs(attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                    temb=None) -> torch.Tensor:
    """softmax(q·kᵀ·scale) of an ``Attention`` module, averaged over heads, in float32 [B, Q, K]: the
    probabilities diffusers' default processor (AttnProcessor2_0) attends with, from the same projections
    and normalisations."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1]).float()
    total = None
    for i in range(attn.heads):   # one head at a time: at most one [B, Q, K] block in memory
        scores = (query[:, i].float() @ key[:, i].float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask[:, i]
        probs = scores.softmax(dim=-1)
        total = probs if total is None else total + probs
    return total / attn.heads


class _Capture:
    """An attention processor that leaves the module's own processor to compute the output (so the UNet's
    output is unchanged to the bit) and hands the head-averaged probabilities to the recorder."""

    def __init__(self, inner, recorder: "AttentionRecorder", block: str, kind: str):
        self.inner, self.recorder, self.block, self.kind = inner, recorder, block, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, **kwargs)
        probs = head_mean_probs(attn, hidden_states, encoder_hidden_states, attention_mask, kwargs.get("temb"))
        self.recorder.record(self.block, self.kind, probs)
        return out


class AttentionRecorder:
    """S-CFG's attention capture for a UNet2DConditionModel: ``with recorder.recording((H, W)) as maps:``
    runs UNet calls with capture processors on the chosen blocks' attn1/attn2 (restored on exit) and folds
    each block's maps into ``maps`` (a ``MapAverage``) as soon as its cross-attention has run, so that at
    most one block's self-attention is held at a time."""

    def __init__(self, unet, factors=FACTORS):
        blocks = attention_levels(unet)
        keep = chosen_levels([lv for *_, lv in blocks], factors)
        self.blocks = [b for b in blocks if b[3] in keep]
        self.levels = {name: level for name, _, _, level in self.blocks}
        self.maps: MapAverage | None = None
        self.latent: tuple[int, int] | None = None
        self.pending: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.blocks)

    @contextlib.contextmanager
    def recording(self, latent_size: tuple[int, int]):
        self.latent = tuple(latent_size)
        finest = grid_at(self.latent, min(self.levels.values()))
        self.maps, self.pending = MapAverage(finest), {}
        swapped = []
        try:
            for name, attn1, attn2, _ in self.blocks:
                for kind, attn in (("self", attn1), ("cross", attn2)):
                    if attn is not None:
                        swapped.append((attn, attn.processor))
                        attn.processor = _Capture(attn.processor, self, name, kind)
            yield self.maps
        finally:
            for attn, processor in reversed(swapped):
                attn.processor = processor
            self.pending = {}

    def record(self, block: str, kind: str, probs: torch.Tensor) -> None:
        if kind == "self":
            self.pending[block] = probs
            return
        size = grid_at(self.latent, self.levels[block])
        self.maps.add(probs, self.pending.pop(block, None), size)


# ---------------------------------------------------------------------------
# The guidance rule for dtk's sampling loop


def check_scfg(model, settings) -> None:
    """One line (BadInput) for a run S-CFG cannot guide: a model without cross-attention, the consistency
    sampler, guidance ≤ 1, an NPO negative branch."""
    from dtk.errors import BadInput

    what = "--guidance-rule scfg"
    if model.family == "pixel" or model.unet is None or not AttentionRecorder(model.unet):
        kind = "a pixel-space model" if model.family == "pixel" else "a UNet without cross-attention"
        raise BadInput(f"{what}: S-CFG reads the UNet's text cross-attention (SD/SDXL models); "
                       f"{model.ref.spec} is {kind}; use --guidance-rule cfg")
    if settings.scheduler == "consistency":
        raise BadInput(f"{what}: the consistency sampler has no CFG branch to reweight; use a diffusion scheduler "
                       "or --guidance-rule cfg")
    if settings.guidance <= 1.0:
        raise BadInput(f"{what}: S-CFG reweights CFG's guidance, it needs --guidance > 1 "
                       f"(this run: {settings.guidance:g})")
    if model.npo is not None:
        raise BadInput(f"{what}: not with --npo {model.npo.spec} (NPO replaces CFG's unconditional branch with "
                       "a second UNet call); use one or the other")


def scfg_rule(model, denoiser, cond, uncond, scale: float):
    """The S-CFG guided output at (x, t): one batched UNet call of both branches with the attention captured,
    then ε_u + s·M ⊙ (ε_c − ε_u)."""
    from dtk.diffusion.conditioning import Conditioning

    recorder = AttentionRecorder(model.unet)
    both = Conditioning.cat([uncond, cond])

    def rule(x, t):
        with recorder.recording(tuple(x.shape[-2:])) as maps:
            out_u, out_c = denoiser.raw(torch.cat([x, x]), t, both).chunk(2)
        return scfg(out_u, out_c, scale, maps.scales(out_c - out_u, scale))
    return rule
