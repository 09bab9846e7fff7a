"""LoRA students through peft (lora_rank > 0): the keys are checked before any model loads (and
a missing peft is named), only the adapters train and only they are checkpointed, resume is
bit-exact, the output layer stays frozen on the fused linear path, engines holding their own
weights get the merged ones, export writes the merged model or the adapter alone, and a 2-rank
FSDP2 step equals the single-process one. Tiny random Qwen3s built here, no downloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from opd_fast.toy.tiny import tiny_setup
from opd_fast.training import lora
from opd_fast.training.config import field_names, make_config
from opd_fast.training.step.rollout import sample_rollouts
from opd_fast.training.trainer import Trainer

peft = pytest.importorskip("peft")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
IDS = [[1, 5, 9, 13, 17, 21, 25, 29]]

RUN = dict(
    steps=4,
    prompts_per_step=4,
    rollouts_per_prompt=2,
    max_new_tokens=8,
    micro_batch_size=3,
    teacher_batch_size=5,
    eval_every=2,
    checkpoint_every=2,
    lr=1e-2,
    progress=False,
    lora_rank=4,
    lora_alpha=8.0,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")))


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    timing = ("per_s", "seconds", "memory")
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


def _base(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


# ---- the keys ---------------------------------------------------------------------------


def test_lora_keys_are_listed_with_their_defaults(capsys):
    from opd_fast.cli import main

    for name in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"):
        assert name in field_names()
    assert main(["config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lora_rank"] == 0 and printed["lora_target_modules"] == "all-linear"
    config = make_config({"lora_rank": "8", "lora_target_modules": "q_proj,v_proj"})
    assert config.lora_rank == 8 and config.lora_target_modules == ["q_proj", "v_proj"]
    config = make_config({"lora_rank": 8, "lora_target_modules": "[q_proj]"})
    assert config.lora_target_modules == ["q_proj"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lora_rank": -1}, "lora_rank must be >= 0"),
        ({"lora_rank": 1.5}, "lora_rank must be an integer"),
        ({"lora_rank": 4, "lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"lora_rank": 4, "lora_dropout": 1.0}, "lora_dropout must be in \\[0, 1\\)"),
        ({"lora_rank": 4, "lora_target_modules": 3}, "a string or a list of strings"),
        ({"lora_rank": 4, "lora_target_modules": "all"}, "all-linear or a list"),
        ({"lora_rank": 4, "lora_target_modules": []}, "must name modules"),
        ({"lora_rank": 4, "lora_target_modules": ["q_proj", "lm_head"]}, "output layer"),
        ({"lora_alpha": 32.0}, "lora_alpha set but lora_rank is 0"),
        ({"lora_target_modules": ["q_proj"]}, "lora_target_modules set but lora_rank is 0"),
    ],
)
def test_bad_lora_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        make_config(values)


def test_missing_peft_is_named_before_any_model_loads(monkeypatch, tiny, tmp_path):
    import transformers

    from opd_fast.training.trainer import train

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    loads = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a)
    )
    missing = 'lora_rank needs the peft package: pip install "opd_fast\\[lora\\]"'
    with pytest.raises(ValueError, match=missing):
        make_config({"lora_rank": 4})
    with pytest.raises(ValueError, match=missing):
        train({**tiny, **RUN, "run_dir": str(tmp_path / "run")})
    assert loads == []
    assert make_config({"lora_rank": 0}).lora_rank == 0  # LoRA off needs no peft


# ---- training and checkpoints -----------------------------------------------------------


def _adapter_names(model) -> set[str]:
    return {name for name, _ in model.named_parameters() if ".lora_" in name}


def test_only_the_adapters_train_and_are_checkpointed(tmp_path, tiny):
    trainer = Trainer(make_config({**tiny, **RUN, "run_dir": str(tmp_path / "run")}))
    student = trainer.parts.student
    adapters = _adapter_names(student)
    assert adapters and all(
        p.requires_grad == (name in adapters) for name, p in student.named_parameters()
    )
    optimized = {id(p) for group in trainer.parts.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for name, p in student.named_parameters() if name in adapters}
    # The output layer is the base one, frozen, on the fused linear path.
    assert trainer.parts.loss_path == "fused_linear"
    assert type(student.get_output_embeddings()) is torch.nn.Linear
    assert not student.get_output_embeddings().weight.requires_grad
    before = {name: t.clone() for name, t in student.state_dict().items()}
    trainer.run()
    after = student.state_dict()
    for name, tensor in after.items():
        changed = not torch.equal(before[name], tensor)
        assert changed == (".lora_B." in name or ".lora_A." in name), name

    step = os.path.join(tmp_path, "run", "checkpoints", "step_000004")
    adapter = os.path.join(step, "adapter")
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    model_files = os.listdir(os.path.join(step, "model"))
    assert "config.json" in model_files
    assert not any(name.endswith(".safetensors") for name in model_files)  # no base weights
    saved = lora.read_adapter(adapter)
    assert set(saved) == adapters
    for name, tensor in saved.items():
        assert torch.equal(tensor, after[name])
    settings = lora.read_adapter_config(adapter)
    assert settings["r"] == 4 and settings["lora_alpha"] == 8.0
    assert settings["base_model_name_or_path"] == tiny["student"]
    # AdamW's state: the adapters' moments only.
    from opd_fast.training.checkpoints.folders import read_trainer_state

    moments = read_trainer_state(step)["optimizer"]["state"]
    assert len(moments) == len(adapters)


def test_resume_restores_the_adapters_bit_exactly(tmp_path, tiny):
    base = {**tiny, **RUN}
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    full = Trainer(make_config(dict(base, run_dir=full_dir)))
    full.run()
    stopped = Trainer(make_config(dict(base, run_dir=resumed_dir))).run(stop_after=3)
    assert stopped["stopped_at_step"] == 3
    resumed = Trainer(make_config(dict(base, run_dir=resumed_dir)))
    resumed.run(resume=True)
    assert _records(full_dir) == _records(resumed_dir)
    want, got = lora.adapter_state(full.parts.student), lora.adapter_state(resumed.parts.student)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # A LoRA checkpoint does not resume a full fine-tune, nor the other way round.
    from opd_fast.training.checkpoints import CheckpointError

    plain = {key: value for key, value in base.items() if not key.startswith("lora_")}
    with pytest.raises(CheckpointError, match="LoRA adapters only"):
        Trainer(make_config(dict(plain, run_dir=resumed_dir))).restore()


def test_target_modules_and_the_output_layer(tmp_path, tiny):
    attention = make_config(
        {**tiny, **RUN, "run_dir": str(tmp_path / "a"), "lora_target_modules": ["q_proj", "v_proj"]}
    )
    student = Trainer(attention).parts.student
    adapted = {name.split(".lora_")[0] for name in _adapter_names(student)}
    assert adapted and all(name.endswith(("q_proj", "v_proj")) for name in adapted)
    nowhere = make_config(
        {**tiny, **RUN, "run_dir": str(tmp_path / "b"), "lora_target_modules": ["no_such_proj"]}
    )
    with pytest.raises(ValueError, match="lora_target_modules"):
        Trainer(nowhere)


def test_lora_step_the_same_on_both_loss_paths_and_with_activation_checkpointing(tmp_path, tiny):
    """The fused linear path (the frozen output weight, no logits) and the logits path, each
    with and without recomputing every layer: the same adapter update on one batch."""
    run = {**tiny, **RUN, "eval_every": 0, "checkpoint_every": 0}
    first = Trainer(make_config({**run, "run_dir": str(tmp_path / "first")}))
    fresh = {name: t.clone() for name, t in lora.adapter_state(first.parts.student).items()}
    batch = sample_rollouts(first.parts)
    first.train_step(batch)
    assert any(not torch.equal(t, fresh[name]) for name, t in
               lora.adapter_state(first.parts.student).items())  # fmt: skip
    want = _adapter_gradients(first.parts.student)  # still in .grad after the step
    for loss_path, recompute in (("logits", False), ("fused_linear", True), ("logits", True)):
        other = Trainer(make_config({**run, "run_dir": str(tmp_path / f"{loss_path}-{recompute}"),
                                     "loss_path": loss_path,
                                     "activation_checkpointing": recompute}))  # fmt: skip
        other.train_step(batch)
        got = _adapter_gradients(other.parts.student)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)


def _adapter_gradients(model) -> dict[str, torch.Tensor]:
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad and
              p.grad is not None]  # fmt: skip
    assert frozen == []
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_lora_sampling_ahead_resumes_exactly(tmp_path, tiny):
    """max_staleness 1: the hf engine samples its own copy, refreshed with the merged
    weights; stopped and resumed, the run's records are the uninterrupted ones."""
    base = {**tiny, **RUN, "max_staleness": 1}
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    Trainer(make_config(dict(base, run_dir=full_dir))).run()
    Trainer(make_config(dict(base, run_dir=resumed_dir))).run(stop_after=2)
    Trainer(make_config(dict(base, run_dir=resumed_dir))).run(resume=True)
    assert _records(full_dir) == _records(resumed_dir)
    assert [r["rollout_staleness"] for r in _records(full_dir) if r["kind"] == "train"] == [
        0, 1, 1, 1,
    ]  # fmt: skip


def _lora_student(tiny, **keys):
    """A LoRA tiny student whose B matrices are random (a fresh adapter is the identity)."""
    model = _base(tiny["student"])
    config = make_config({"lora_rank": 4, "lora_alpha": 8.0, **keys})
    lora.apply_lora(model, config, tiny["student"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def test_merged_weights_for_the_engines(tiny):
    """What vLLM (and the hf engine's own copy) is pushed: the base model's names, and weights
    with which the plain model computes the LoRA model's logits."""
    student = _lora_student(tiny)
    plain = _base(tiny["student"]).eval()
    merged = dict(lora.engine_state_items(student))
    assert merged.keys() == plain.state_dict().keys()
    plain.load_state_dict(merged)
    torch.testing.assert_close(_logits(plain), _logits(student), rtol=1e-5, atol=1e-5)
    assert not torch.equal(_logits(plain), _logits(_base(tiny["student"]).eval()))
    halves = dict(lora.engine_state_items(student, torch.float16))
    assert all(t.dtype == torch.float16 for t in halves.values() if t.is_floating_point())

    from opd_fast.training.rollouts.hf import HFEngine

    engine = HFEngine(student, None, own_copy=True)  # sampling ahead: an unsharded plain copy
    torch.testing.assert_close(_logits(engine.model), _logits(student), rtol=1e-5, atol=1e-5)


def _export(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "opd_fast", "export", *args],
        capture_output=True, text=True, timeout=180, env=env, cwd=REPO,
    )  # fmt: skip


def test_export_merged_and_adapter_only(tmp_path, tiny):
    run_dir = str(tmp_path / "run")
    trainer = Trainer(make_config({**tiny, **RUN, "run_dir": run_dir}))
    trainer.run()
    trained = _logits(trainer.parts.student.eval())
    merged = str(tmp_path / "merged")
    result = _export("--run", run_dir, "--out", merged)
    assert result.returncode == 0, result.stderr[-3000:]
    model = _base(merged).eval()
    assert not any(".lora_" in name for name in model.state_dict())
    torch.testing.assert_close(_logits(model), trained, rtol=1e-5, atol=1e-5)

    adapter = str(tmp_path / "adapter")
    result = _export("--run", run_dir, "--step", "4", "--out", adapter, "--adapter-only")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(_base(tiny["student"]), adapter).eval()
    torch.testing.assert_close(_logits(loaded), trained, rtol=1e-5, atol=1e-5)


def test_adapter_only_export_of_a_full_fine_tune_is_refused(tmp_path, tiny):
    from opd_fast.training.checkpoints.export import export

    plain = {key: value for key, value in RUN.items() if not key.startswith("lora_")}
    run_dir = str(tmp_path / "run")
    Trainer(make_config({**tiny, **plain, "steps": 2, "run_dir": run_dir})).run()
    with pytest.raises(ValueError, match="adapter-only.*fully fine-tuned"):
        export(run_dir, None, str(tmp_path / "out"), adapter_only=True)


# ---- two FSDP2 ranks (gloo) ---------------------------------------------------------------


def _torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        os.path.join(HERE, "distributed_worker.py"), *args,
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


TWO_RANKS = dict(
    RUN, steps=3, max_new_tokens=6, micro_batch_size=2, teacher_batch_size=4, eval_every=0,
    eval_max_prompts=5, checkpoint_every=1,
)  # fmt: skip


def test_two_rank_lora_step_equals_single_process_step(tmp_path, tiny):
    values = dict(**tiny, **TWO_RANKS, run_dir=str(tmp_path / "single"))
    single = Trainer(make_config(values))
    batch, examples = sample_rollouts(single.parts)
    batch_path = str(tmp_path / "batch.pt")
    torch.save((batch, examples), batch_path)
    student = single.parts.student
    single.train_step((batch, examples))
    expected = {name: t.detach().clone() for name, t in student.state_dict().items()}
    config = str(tmp_path / "c.json")
    with open(config, "w") as handle:
        json.dump({**values, "run_dir": str(tmp_path / "two")}, handle)
    out = str(tmp_path / "two.pt")
    result = _torchrun(["step", config, "--batch", batch_path, "--out", out])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    got = torch.load(out, weights_only=False)
    gradients = {name: p.grad for name, p in student.named_parameters() if p.requires_grad}
    assert got["gradients"].keys() == gradients.keys() == _adapter_names(student)
    for name, value in gradients.items():
        torch.testing.assert_close(got["gradients"][name], value, rtol=1e-4, atol=1e-7)
    assert got["parameters"].keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got["parameters"][name], value, rtol=1e-5, atol=5e-6)


def test_two_rank_lora_run_checkpoints_adapters_resumes_and_exports(tmp_path, tiny):
    full_dir = str(tmp_path / "full")
    config = str(tmp_path / "full.json")
    with open(config, "w") as handle:
        json.dump({**tiny, **TWO_RANKS, "run_dir": full_dir}, handle)
    logits_path = str(tmp_path / "logits.pt")
    result = _torchrun(["run", config, "--logits", logits_path])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    final = os.path.join(full_dir, "checkpoints", "step_000003")
    assert sorted(os.listdir(os.path.join(final, "adapter"))) == [
        "adapter_config.json", "adapter_model.safetensors",
    ]  # fmt: skip
    assert not any(n.endswith(".safetensors") for n in os.listdir(os.path.join(final, "model")))
    # (Each rank samples its own rollouts: a 2-rank run is compared with the single process
    # step by step, on one global batch, above; here with itself, stopped and resumed.)
    two = lora.read_adapter(os.path.join(final, "adapter"))
    assert two.keys() == _adapter_names(Trainer(make_config(
        {**tiny, **TWO_RANKS, "run_dir": str(tmp_path / "one")})).parts.student)  # fmt: skip
    # Stopped after 2 steps, resumed on 2 ranks: the same records and adapters.
    part_dir = str(tmp_path / "part")
    part = str(tmp_path / "part.json")
    with open(part, "w") as handle:
        json.dump({**tiny, **TWO_RANKS, "run_dir": part_dir}, handle)
    for args in (["--stop-after", "2"], ["--resume"]):
        result = _torchrun(["run", part, *args])
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert _records(part_dir) == _records(full_dir)
    resumed = lora.read_adapter(os.path.join(part_dir, "checkpoints", "step_000003", "adapter"))
    for name in two:
        assert torch.equal(resumed[name], two[name]), name
    # Export: the end's merged model has the trained logits; a mid-run (dcp-only) step exports.
    merged = str(tmp_path / "merged")
    result = _export("--run", full_dir, "--out", merged)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(
        _logits(_base(merged).eval()), torch.load(logits_path), rtol=1e-5, atol=1e-5
    )
    early = str(tmp_path / "early")
    result = _export("--run", full_dir, "--step", "2", "--out", early, "--adapter-only")
    assert result.returncode == 0, result.stderr[-3000:]
    assert lora.read_adapter(early).keys() == two.keys()
