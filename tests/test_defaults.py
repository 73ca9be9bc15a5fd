"""One source of defaults: a Python caller of a method and ``train`` gets the run a shell user gets."""

import inspect

import pytest

from dtk.methods.defaults import DPO, NPO_FROM_PAIRS, SELF_NPO, TRAINING
from dtk.train.config import TrainConfig

# command → (the method classes it builds, the training-defaults key of each mode)
COMMANDS = {
    "train-reflow": ("dtk.methods.reflow:RectifiedDiffusion",),
    "distill-pcm": ("dtk.methods.pcm:PhasedConsistency", "dtk.methods.lcm:LatentConsistency"),
    "tune-sct": ("dtk.methods.sct:ConsistencyTuning",),
    "dpo": ("dtk.methods.dpo:DiffusionDPO",),
    "train-npo": ("dtk.methods.self_npo:SelfNPO",),
}


def method_class(spec):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def cli_defaults(name: str) -> dict:
    import importlib

    from dtk.cli import COMMANDS as MODULES

    def default(p):
        if type(p.default).__name__ != "Sentinel":
            return p.default
        return False if getattr(p, "is_flag", False) else None   # click ≥ 8.2: an unset default is UNSET

    return {p.name: default(p) for p in importlib.import_module(MODULES[name]).command.params}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_cli_shows_the_methods_defaults(name):
    """Every option that is also a method setting has the method's default (None: the method chooses)."""
    shown = cli_defaults(name)
    for key in ("lr", "max_steps", "batch_size", "lora_rank"):
        assert shown[key] == TRAINING[name][key], (name, key)
    for spec in COMMANDS[name]:
        method = method_class(spec)
        for param, p in inspect.signature(method.__init__).parameters.items():
            if param not in shown or shown[param] is None or p.default is inspect.Parameter.empty:
                continue
            # None: the method chooses when constructed (e.g. DPO's β)
            expected = p.default if p.default is not None else getattr(method(), param, None)
            assert shown[param] == expected, (name, spec, param, shown[param], expected)


def test_a_python_caller_gets_the_shell_users_settings():
    from dtk.methods.dpo import DiffusionDPO
    from dtk.methods.self_npo import SelfNPO

    dpo, npo = DiffusionDPO(), DiffusionDPO(reverse=True, name="train-npo")
    assert (dpo.beta, dpo.empty_prompt_prob) == (DPO["beta"], DPO["empty_prompt_prob"]) == (5000.0, 0.2)
    assert (npo.beta, npo.empty_prompt_prob) == (NPO_FROM_PAIRS["beta"], NPO_FROM_PAIRS["empty_prompt_prob"])
    self_npo = SelfNPO()
    assert self_npo.empty_prompt_prob == SELF_NPO["empty_prompt_prob"] == 0.0
    config = TrainConfig(out="x").with_defaults(self_npo.training_defaults)
    assert (config.lr, config.ema_decay, config.lora_rank) == (1e-6, 0.999, 8)
    config = TrainConfig(out="x", lr=3e-5).with_defaults(npo.training_defaults)   # what the caller set stays
    assert (config.lr, config.ema_decay, config.max_steps) == (3e-5, 0.0, 2000)
    config = TrainConfig(out="x")
    config.check()   # no method: the engine's own defaults
    assert (config.lr, config.batch_size, config.ema_decay) == (1e-4, 4, 0.0)


def test_train_npo_self_takes_its_own_defaults_unless_given(run_dtk, monkeypatch, tmp_path):
    """The shell user's train-npo --self gets SelfNPO's lr and EMA, an explicit --lr wins."""
    import dtk.cli.training as training

    seen = []
    monkeypatch.setattr(training, "run_training", lambda method, config: seen.append(
        config.with_defaults(method.training_defaults)))
    import dtk.cli.train_npo as train_npo

    monkeypatch.setattr(train_npo, "run_training", training.run_training)
    assert run_dtk("train-npo", "--self", "--data", tmp_path, "--out", tmp_path / "a").exit_code == 0
    assert run_dtk("train-npo", "--self", "--lr", "2e-6", "--data", tmp_path, "--out", tmp_path / "b").exit_code == 0
    assert run_dtk("train-npo", "--from-pairs", "--data", tmp_path, "--out", tmp_path / "c").exit_code == 0
    assert [(c.lr, c.ema_decay) for c in seen] == [(1e-6, 0.999), (2e-6, 0.999), (5e-6, 0.0)]
