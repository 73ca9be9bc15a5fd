"""Each paper's objective as a plain function: called here with denoisers over closed-form networks, no engine.

An oracle network knows the data (one latent c): its ε̂ = (x_t − α_t c)/σ_t is exact, so any objective whose
target is the data, the ODE's own path or the model itself is zero for it, and a biased oracle is not.
"""

import math

import pytest
import torch

from dtk.diffusion.conditioning import Conditioning
from dtk.diffusion.denoiser import Denoiser, Guided, VPSchedule
from dtk.diffusion.schedule import alphas_cumprod
from dtk.train.state import PerExample

ABAR = alphas_cumprod({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                       "beta_end": 0.012})
C = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(0))


def oracle(bias: float = 0.0) -> Denoiser:
    def net(x, t, return_dict=False, **cond):
        a = ABAR[t].float().view(-1, 1, 1, 1)
        return ((x - a.sqrt() * C) / (1 - a).sqrt() + bias,)
    return Denoiser(net, VPSchedule(ABAR), "epsilon")


def encode(captions):
    return Conditioning(None)


def data(n=3):
    return C.expand(n, *C.shape).clone(), ["a", "b", "c"][:n]


def test_phased_reflow_is_zero_for_the_oracle():
    from dtk.methods.reflow import phased_loss

    x0, captions = data()
    kw = dict(phases=4, huber_c=0.001, empty_prompt_prob=0.0)
    exact = phased_loss(oracle(), Guided(oracle(), 1.0), x0, captions, encode, PerExample([1, 2, 3], "cpu"), **kw)
    off = phased_loss(oracle(0.05), Guided(oracle(), 1.0), x0, captions, encode, PerExample([1, 2, 3], "cpu"), **kw)
    assert float(exact) < 1e-4 < 1e-3 < float(off)


def test_self_npo_is_zero_for_the_oracle_and_unguided_teacher():
    from dtk.methods.self_npo import self_npo_loss

    x0, captions = data()
    kw = dict(teacher_steps=3, huber_c=0.001, empty_prompt_prob=0.0)
    exact, t_prime = self_npo_loss(oracle(), Guided(oracle(), 0.0, "lcm"), x0, captions, encode,
                                   PerExample([4, 5, 6], "cpu"), **kw)
    off, _ = self_npo_loss(oracle(0.05), Guided(oracle(), 0.0, "lcm"), x0, captions, encode,
                           PerExample([4, 5, 6], "cpu"), **kw)
    assert float(exact) < 1e-4 < 1e-3 < float(off) and t_prime.shape == (3,)


def test_dpo_starts_at_log_2_and_falls_when_the_winner_gets_easier():
    from dtk.methods.dpo import diffusion_dpo_loss, sft_loss

    x_w, _ = data(2)
    x_l = -x_w
    t, eps = torch.tensor([300, 700]), torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    valid = torch.tensor([True, True])
    loss, inside, _ = diffusion_dpo_loss(oracle(0.1), oracle(0.1), x_w, x_l, t, eps, Conditioning(None),
                                         beta=5000.0, valid=valid)
    assert float(loss) == pytest.approx(math.log(2)) and torch.equal(inside, torch.zeros(2))
    # the policy knows the winner's data exactly (the reference is off by the bias): lower loss
    better, _, _ = diffusion_dpo_loss(oracle(), oracle(0.1), x_w, x_l, t, eps, Conditioning(None), beta=5000.0,
                                      valid=valid)
    assert float(better) < math.log(2)
    assert float(sft_loss(oracle(), x_w, t, eps, Conditioning(None), valid)) < 1e-10
    assert float(sft_loss(oracle(0.1), x_w, t, eps, Conditioning(None), valid)) == pytest.approx(0.01, rel=1e-4)


def test_consistency_tuning_is_zero_for_an_exact_denoiser():
    from dtk.diffusion.edm import phase_sigmas
    from dtk.methods.sct import consistency_tuning_loss

    x0, _ = data()

    def exact(x, sigma, **kw):   # D(x, σ) = the data: every point's consistency function is exact
        return C.expand_as(x)

    def biased(x, sigma, **kw):
        return C.expand_as(x) + 0.05 * x

    kw = dict(stage=0, boundaries=phase_sigmas(2, 0.002, 80.0), p_mean=-0.8, p_std=1.6, sigma_max=80.0, q=4.0,
              weighting="edm", sigma_data=0.5, huber_c=0.06)
    zero, logs = consistency_tuning_loss(exact, exact, x0, Conditioning(None), PerExample([7, 8, 9], "cpu"), **kw)
    assert float(zero) < 1e-9 and 0 <= logs["dt_over_t"] <= 1
    off, _ = consistency_tuning_loss(biased, exact, x0, Conditioning(None), PerExample([7, 8, 9], "cpu"), **kw)
    assert float(off) > 1e-3
    # SCT's target with the batch as references: the same for an exact denoiser
    stable, _ = consistency_tuning_loss(exact, exact, x0, Conditioning(None), PerExample([7, 8, 9], "cpu"),
                                        references=x0, **kw)
    assert float(stable) < 1e-9


def test_lcm_target_carries_no_gradient():
    """LCM: the student's f at x_t against the stop-gradient f at the teacher's x_t'; only the student's pass
    trains."""
    from dtk.methods.lcm import lcm_loss

    x0, captions = data()
    scale = torch.nn.Parameter(torch.tensor(1.0))

    def net(x, t, return_dict=False, **cond):
        return (oracle().net(x, t)[0] * scale,)

    student = Denoiser(net, VPSchedule(ABAR), "epsilon")
    kw = dict(n=50, w_range=(1.0, 1.0), cfg_solver=True, empty_prompt_prob=0.0, loss="l2", huber_c=0.001)
    loss = lcm_loss(student, student, oracle(), x0, captions, encode, PerExample([1, 2, 3], "cpu"), **kw)
    loss.backward()
    with torch.no_grad():   # the same loss with the target's pass made of a frozen copy: the same gradient
        frozen = Denoiser(lambda x, t, return_dict=False, **c: (oracle().net(x, t)[0] * float(scale),),
                          VPSchedule(ABAR), "epsilon")
    grad = scale.grad.clone()
    scale.grad = None
    lcm_loss(student, frozen, oracle(), x0, captions, encode, PerExample([1, 2, 3], "cpu"), **kw).backward()
    assert torch.isfinite(loss) and torch.allclose(scale.grad, grad)
