"""dtk sample on a single-file checkpoint in the original SD (LDM) layout, offline.

The checkpoint is the tiny SD pipeline's own weights rewritten to the LDM layout
(tests/ldm_layout.py), so loading it through diffusers' single-file path with
--model-config must give exactly the pipeline directory's images.
"""

import pytest
from helpers import pixels


@pytest.fixture(scope="module")
def tiny_sd_single_file(tiny_sd, tmp_path_factory):
    from safetensors.torch import save_file

    from ldm_layout import diffusers_to_ldm

    path = tmp_path_factory.mktemp("single-file") / "tiny-sd.safetensors"
    save_file(diffusers_to_ldm(tiny_sd), str(path))
    return path


def sample_two(run_dtk, model, out, *args):
    return run_dtk("sample", "--model", model, "--out", out, "--steps", "3", "--seed", "11",
                   "--num-per-prompt", "2", *args, "a red circle")


def test_ldm_layout_is_what_diffusers_detects_as_sd1(tiny_sd_single_file):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, is_clip_model
    from safetensors.torch import load_file

    from dtk.diffusion.loading import SD, _single_file_family

    checkpoint = load_file(str(tiny_sd_single_file))
    assert _single_file_family(tiny_sd_single_file) == SD
    assert {k.split(".")[0] for k in checkpoint} == {"model", "first_stage_model", "cond_stage_model"}
    # What diffusers keys on without --model-config: an SD1.x UNet (not inpainting, SD2, SDXL, …)
    # and a CLIP text encoder it will convert.
    assert infer_diffusers_model_type(checkpoint) == "v1"
    assert is_clip_model(checkpoint)


def test_single_file_with_model_config_matches_the_pipeline_dir(run_dtk, tiny_sd, tiny_sd_single_file, tmp_path):
    r = sample_two(run_dtk, tiny_sd, tmp_path / "dir")
    assert r.exit_code == 0, r.stderr
    r = sample_two(run_dtk, tiny_sd_single_file, tmp_path / "file", "--model-config", tiny_sd)
    assert r.exit_code == 0, r.stderr
    expected, got = pixels(tmp_path / "dir"), pixels(tmp_path / "file")
    assert sorted(got) == ["000000.png", "000001.png"]
    assert expected["000000.png"] != expected["000001.png"]  # the two seeds really differ
    # Same weights (bit for bit: the LDM layout only renames and reshapes), same code → same pixels.
    assert got == expected


def test_single_file_without_model_config_is_a_one_line_usage_error(run_dtk, tiny_sd_single_file, tmp_path,
                                                                    monkeypatch):
    import huggingface_hub.constants

    # Offline, and a hub cache with nothing in it: the SD1.5 configs diffusers would fall back to
    # are not found however this machine's real cache looks.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    out = tmp_path / "o"
    r = sample_two(run_dtk, tiny_sd_single_file, out)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "--model-config" in lines[0] and str(tiny_sd_single_file) in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists()


def test_a_single_file_loads_with_the_hub_switched_off(run_dtk, tiny_sd_single_file, tmp_path, monkeypatch):
    """diffusers would fetch a missing architecture config from the network: dtk loads with the hub off."""
    import huggingface_hub.constants
    from diffusers import StableDiffusionPipeline

    seen = []

    def spy(*args, **kwargs):
        seen.append(huggingface_hub.constants.HF_HUB_OFFLINE)
        raise OSError("no config")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", spy)
    r = sample_two(run_dtk, tiny_sd_single_file, tmp_path / "o")
    assert r.exit_code == 2 and seen == [True] and huggingface_hub.constants.HF_HUB_OFFLINE is False
