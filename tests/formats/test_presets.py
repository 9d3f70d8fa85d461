"""The shipped presets: init presets load strictly, pretrain presets name real options, and the
SLURM launcher's dry run prints the command it would run without running anything."""
import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flamingo_cli.model.config import FlamingoConfig

ROOT = Path(__file__).resolve().parents[2]
STAGES = ROOT / "stages"
SBATCH = ROOT / "examples" / "pretrain" / "slurm.sbatch"

INIT_PRESETS = sorted((STAGES / "init").glob("*.yaml"))
PRETRAIN_PRESETS = sorted((STAGES / "pretrain").glob("*.yaml"))

PRETRAIN_OPTIONS = {"data", "weight", "batch", "steps", "lr", "warmup", "weight_decay", "grad_clip",
                    "gate_lr_mult", "save_every", "dtype", "grad_checkpointing", "window", "max_images",
                    "p_next", "video_frames", "video_fps", "seed"}

OPENFLAMINGO = {  # released models: (LM, cross-attention every N layers)
    "openflamingo-3b": ("mosaicml/mpt-1b-redpajama-200b", 1),
    "openflamingo-4b": ("togethercomputer/RedPajama-INCITE-Base-3B-v1", 2),
    "openflamingo-9b": ("mosaicml/mpt-7b", 4),
}


def _pairs(entries, what):
    """["NAME=VALUE", ...] -> {NAME: VALUE}, each entry well formed and each name once."""
    assert isinstance(entries, list) and entries, f"{what} must be a non-empty list"
    out = {}
    for entry in entries:
        assert isinstance(entry, str), f"{what}: {entry!r} is not a string"
        name, sep, value = entry.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][\w-]*", name) and value, f"{what}: {entry!r} is not NAME=VALUE"
        assert name not in out, f"{what}: {name} given twice"
        out[name] = value
    return out


def _load(path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: expected a mapping"
    return data


# -- init -----------------------------------------------------------------------------------------

def test_init_presets_exist():
    names = {p.stem for p in INIT_PRESETS}
    assert {"tiny", "flamingo-paper", *OPENFLAMINGO} <= names


@pytest.mark.parametrize("path", INIT_PRESETS, ids=lambda p: p.stem)
def test_init_preset_loads_strictly(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{path.name}: start with a comment saying where the numbers come from"
    config = FlamingoConfig.from_yaml(text)  # unknown keys raise ConfigError
    assert FlamingoConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", sorted(OPENFLAMINGO))
def test_openflamingo_init_presets(name):
    lm, every = OPENFLAMINGO[name]
    config = FlamingoConfig.from_yaml((STAGES / "init" / f"{name}.yaml").read_text(encoding="utf-8"))
    assert config.lm.path == lm
    assert config.encoder.name == "vit_large_patch14_clip_224.openai"
    assert config.encoder.keep_cls is False and config.encoder.final_norm is False
    # OpenAI's CLIP towers use QuickGELU; timm's .openai config alone would build plain GELU.
    assert config.encoder.kwargs == {"act_layer": "quick_gelu"} and config.encoder.pretrained is True
    r = config.resampler
    assert (r.dim, r.depth, r.heads, r.dim_head, r.num_latents, r.ff_mult, r.max_frames, r.activation) == (
        1024, 6, 8, 64, 64, 4, 0, "gelu")
    x = config.xattn
    assert (x.every, x.placement, x.heads, x.dim_head, x.ff_mult, x.masking) == (
        every, "openflamingo", 8, 64, 4, "last_image")


# Released IDEFICS models: (LM hidden, FFN width, layers, heads, RMSNorm eps, LM hub id) -- LLaMA's published sizes.
IDEFICS = {"idefics-9b": (4096, 11008, 32, 32, 1e-6, "huggyllama/llama-7b"),
           "idefics-80b": (8192, 22016, 80, 64, 1e-5, "huggyllama/llama-65b")}


@pytest.mark.parametrize("name", [f"{n}{v}" for n in sorted(IDEFICS) for v in ("", "-instruct")])
def test_idefics_init_presets_are_what_the_importer_builds(name):
    """An IDEFICS preset is the config `import idefics` derives from a checkpoint of that shape, with
    the tower's timm weights named: so a model inited from it and one imported line up."""
    import timm
    from transformers import IdeficsConfig

    from flamingo_cli.importers.idefics import END_OF_UTTERANCE, FAKE_TOKEN, Tokens, flamingo_config

    hidden, ffn, layers, heads, eps, lm = IDEFICS[name.removesuffix("-instruct")]
    hf = IdeficsConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                       rms_norm_eps=eps, cross_layer_interval=4, qk_layer_norms=True, use_resampler=True,
                       vocab_size=32000, additional_vocab_size=2,
                       vision_config=dict(embed_dim=1280, image_size=224, intermediate_size=5120, patch_size=14,
                                          num_hidden_layers=32, num_attention_heads=16, hidden_act="gelu"),
                       perceiver_config=dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                                             resampler_head_dim=96, qk_layer_norms_perceiver=True))
    instruct = name.endswith("-instruct")
    tokens = Tokens([FAKE_TOKEN, "<image>", *([END_OF_UTTERANCE] if instruct else [])],
                    END_OF_UTTERANCE if instruct else "</s>")
    imported = flamingo_config(hf, tokens, None, name)
    preset = FlamingoConfig.from_yaml((STAGES / "init" / f"{name}.yaml").read_text(encoding="utf-8"))
    assert preset.encoder.name == imported.encoder.name + ".laion2b" and preset.encoder.pretrained
    assert preset.encoder.name in timm.list_pretrained("vit_huge_patch14_clip_224*")
    assert preset.lm.path == lm
    assert dataclasses.replace(preset, encoder=dataclasses.replace(preset.encoder, name=imported.encoder.name,
                                                                   pretrained=False),
                               lm=imported.lm) == imported


# -- pretrain -------------------------------------------------------------------------------------

def _command_options():
    """The real option names once `flamingo pretrain` exists; None before."""
    from flamingo_cli.cli import cli

    command = getattr(cli, "commands", {}).get("pretrain")
    return None if command is None else {p.name for p in command.params if p.name}


def test_pretrain_presets_exist():
    names = {p.stem for p in PRETRAIN_PRESETS}
    assert {"tiny", "paper-mixture", *OPENFLAMINGO} <= names


@pytest.mark.parametrize("path", PRETRAIN_PRESETS, ids=lambda p: p.stem)
def test_pretrain_preset_keys_are_options(path):
    assert path.read_text(encoding="utf-8").startswith("#"), f"{path.name}: start with a comment"
    keys = {str(k).replace("-", "_") for k in _load(path)}
    assert keys <= PRETRAIN_OPTIONS, f"{path.name}: not options: {sorted(keys - PRETRAIN_OPTIONS)}"
    real = _command_options()
    if real is not None:
        assert keys <= real, f"{path.name}: not options of flamingo pretrain: {sorted(keys - real)}"


@pytest.mark.parametrize("path", PRETRAIN_PRESETS, ids=lambda p: p.stem)
def test_pretrain_preset_values(path):
    data = _load(path)
    shards = _pairs(data["data"], "data")
    for name, pattern in shards.items():
        assert pattern.endswith(".tar") or "{" in pattern, f"data {name}: {pattern!r} is not a shard pattern"
        assert pattern.count("{") == pattern.count("}"), f"data {name}: unbalanced braces in {pattern!r}"
    for key, cast in (("weight", float), ("batch", int)):
        if key in data:
            values = _pairs(data[key], key)
            assert set(values) <= set(shards), f"{key} names datasets not in data: {sorted(set(values) - set(shards))}"
            for name, value in values.items():
                assert cast(value) > 0, f"{key} {name}={value}"
    if "dtype" in data:
        assert data["dtype"] in ("float32", "bfloat16")
    for key in ("steps", "warmup", "save_every", "window", "max_images", "seed"):
        if key in data:
            assert isinstance(data[key], int) and not isinstance(data[key], bool), f"{key} must be an int"
    for key in ("lr", "weight_decay", "grad_clip", "gate_lr_mult", "p_next"):
        if key in data:
            assert isinstance(data[key], (int, float)) and not isinstance(data[key], bool), f"{key} must be a number"


def test_paper_mixture():
    data = _load(STAGES / "pretrain" / "paper-mixture.yaml")
    weights = {k: float(v) for k, v in _pairs(data["weight"], "weight").items()}
    assert weights == {"m3w": 1.0, "align": 0.2, "ltip": 0.2, "vtp": 0.03}
    batches = {k: int(v) for k, v in _pairs(data["batch"], "batch").items()}
    assert batches == {"m3w": 256, "align": 512, "ltip": 512, "vtp": 64}
    assert (data["lr"], data["warmup"], data["weight_decay"], data["grad_clip"]) == (1e-4, 5000, 0.1, 1.0)
    assert (data["window"], data["max_images"], data["p_next"], data["dtype"]) == (256, 5, 0.5, "bfloat16")


@pytest.mark.parametrize("name", sorted(OPENFLAMINGO))
def test_openflamingo_pretrain_presets(name):
    data = _load(STAGES / "pretrain" / f"{name}.yaml")
    assert set(_pairs(data["data"], "data")) == {"mmc4", "laion"}
    weights = {k: float(v) for k, v in _pairs(data["weight"], "weight").items()}
    assert weights == {"mmc4": 1.0, "laion": 0.2}
    batches = {k: int(v) for k, v in _pairs(data["batch"], "batch").items()}
    assert batches["laion"] == 2 * batches["mmc4"]
    assert (data["lr"], data["weight_decay"], data["grad_clip"], data["dtype"]) == (1e-4, 0.1, 1.0, "bfloat16")
    assert (data["window"], data["max_images"], data["p_next"]) == (256, 5, 0.5)


def test_tiny_pretrain_preset():
    data = _load(STAGES / "pretrain" / "tiny.yaml")
    assert _pairs(data["data"], "data") == {"pairs": "shards/pairs-{000000..000001}.tar",
                                            "docs": "shards/docs-{000000..000001}.tar"}
    assert data["dtype"] == "float32" and data["steps"] == 20


# -- SLURM launcher -------------------------------------------------------------------------------

@pytest.fixture
def launcher(tmp_path):
    """Run slurm.sbatch with fake torchrun/srun/scontrol on PATH that leave a marker if called,
    and an nvidia-smi that sees no GPU."""
    fake = tmp_path / "bin"
    fake.mkdir()
    marker = tmp_path / "executed"
    for tool in ("torchrun", "srun", "scontrol"):
        (fake / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> '{marker}'\n")
        (fake / tool).chmod(0o755)
    for tool, body in (("flamingo", "exit 0"), ("nvidia-smi", "exit 0")):
        (fake / tool).write_text(f"#!/bin/sh\n{body}\n")
        (fake / tool).chmod(0o755)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("NNODES", "NPROC_PER_NODE", "PRESET", "CKPT", "RUN_DIR",
                                                          "EXTRA_ARGS", "MASTER_PORT", "DRY_RUN", "OMP_NUM_THREADS",
                                                          "CUDA_VISIBLE_DEVICES")}
    base["PATH"] = f"{fake}:{os.environ.get('PATH', '')}"

    def run(*args, **env):
        r = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env={**base, **env},
                           capture_output=True, text=True, timeout=30)
        assert not marker.exists(), f"the dry run executed something: {marker.read_text()}"
        return r

    run.fake = fake
    return run


def test_sbatch_asks_for_no_resources_of_its_own():
    """Resources live in one place, sbatch's command line: a CPU partition or a smaller node
    takes the script as it is."""
    assert shutil.which("bash")
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text(encoding="utf-8")
    assert "set -euo pipefail" in text
    directives = [line.split()[1].split("=")[0] for line in text.splitlines() if line.startswith("#SBATCH")]
    assert directives == ["--job-name", "--output"]


def _line(r):
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1, r.stdout
    return r.stdout.strip()


def test_sbatch_dry_run_single_node(launcher):
    line = _line(launcher(DRY_RUN="1"))
    for part in ("torchrun --standalone", "--nproc_per_node 1 ", " pretrain ", "--config openflamingo-3b"):
        assert part in line, line
    assert not line.startswith("srun")
    assert str(launcher.fake / "flamingo") in line  # the console script torchrun runs


@pytest.mark.parametrize("env, nproc", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "h100:8", "CUDA_VISIBLE_DEVICES": "0"}, 4),
    ({"SLURM_GPUS_PER_NODE": "h100:8", "CUDA_VISIBLE_DEVICES": "0"}, 8),
    ({"SLURM_GPUS_PER_NODE": "2"}, 2),
    ({"CUDA_VISIBLE_DEVICES": "0,1,3"}, 3),
    ({"NPROC_PER_NODE": "5", "SLURM_GPUS_ON_NODE": "4"}, 5),
    ({}, 1),
])
def test_sbatch_takes_the_process_count_from_the_allocation(launcher, env, nproc):
    assert f"--nproc_per_node {nproc} " in _line(launcher(DRY_RUN="1", **env))


def test_sbatch_nvidia_smi_counts_gpus_outside_slurm(launcher):
    (launcher.fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: H200 (UUID: a)'\necho 'GPU 1: H200 (UUID: b)'\n")
    assert "--nproc_per_node 2 " in _line(launcher(DRY_RUN="1"))


def test_sbatch_splits_the_cpus_of_a_task_between_its_processes(launcher):
    r = launcher(DRY_RUN="1", SLURM_CPUS_PER_TASK="32", SLURM_GPUS_ON_NODE="8")
    assert r.stderr == "OMP_NUM_THREADS=4\n"
    assert launcher(DRY_RUN="1", SLURM_CPUS_PER_TASK="32", OMP_NUM_THREADS="3").stderr == "OMP_NUM_THREADS=3\n"  # the user's own


def test_sbatch_dry_run_flag_and_knobs(launcher):
    line = _line(launcher("--dry-run", "--seed", "3", NNODES="1", NPROC_PER_NODE="2", PRESET="tiny",
                          EXTRA_ARGS="--steps 7 --lr 0.01"))
    assert "--nproc_per_node 2" in line and "--config tiny" in line
    assert line.endswith("--steps 7 --lr 0.01 --seed 3"), line


def test_sbatch_dry_run_multi_node(launcher):
    line = _line(launcher(DRY_RUN="1", NNODES="2", NPROC_PER_NODE="4", PRESET="openflamingo-9b",
                          EXTRA_ARGS="--steps 6"))
    assert line.startswith("srun --nodes 2 --ntasks 2 --ntasks-per-node 1 torchrun --nnodes 2 --nproc_per_node 4 "), line
    assert "--rdzv_backend c10d --rdzv_endpoint localhost:29500 --rdzv_id local" in line
    assert "--standalone" not in line
    assert " pretrain " in line and "--config openflamingo-9b" in line
    assert line.endswith("--steps 6")


def test_sbatch_dry_run_multi_node_under_slurm(launcher):
    """Under SLURM the head is the allocation's first host, the job id names the rendezvous and
    picks its port, and a job given --ntasks-per-node 8 still starts one torchrun per node."""
    (launcher.fake / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    slurm = dict(SLURM_NNODES="2", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_ID="1234",
                 SLURM_NTASKS_PER_NODE="8", SLURM_NTASKS="16", SLURM_GPUS_ON_NODE="8")
    line = _line(launcher(DRY_RUN="1", **slurm))
    assert "srun --nodes 2 --ntasks 2 --ntasks-per-node 1 torchrun --nnodes 2 --nproc_per_node 8 " in line
    assert "--rdzv_endpoint node-a:21234 --rdzv_id 1234" in line
    assert "runs/openflamingo-3b-1234" in line
    assert "node-a:25678 " in _line(launcher(DRY_RUN="1", **{**slurm, "SLURM_JOB_ID": "925678"}))
    assert "node-a:29600 " in _line(launcher(DRY_RUN="1", MASTER_PORT="29600", **slurm))


def test_sbatch_without_flamingo_fails_outside_dry_run(launcher):
    (launcher.fake / "flamingo").unlink()
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not (Path(p) / "flamingo").exists())
    r = launcher(NNODES="1", PATH=f"{launcher.fake}{os.pathsep}{path}")
    assert r.returncode == 1 and "flamingo" in r.stderr and r.stdout == ""
