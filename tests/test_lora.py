"""LoRA (lmforge.model.lora, train.lora in the trainer): fresh adapters change nothing; only the adapters get
gradients and sit in the optimizer; a LoRA run's checkpoint holds only them plus a reference to the base, and
reloads (lmforge.load, checkpoint.load into a wrapped or a plain model); a changed or missing base is a one-line
error; `lmforge lora merge` gives the unmerged logits (1e-5); `lmforge lora export` gives, through
peft.PeftModel on our HF export of the base, our logits (1e-4); a LoRA run resumes bit for bit after SIGKILL."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge import checkpoint as ckpt
from lmforge.cli import main
from lmforge.data.synthetic import VOCAB
from lmforge.errors import CheckpointError, ConfigError
from lmforge.eval.bpb import token_byte_lengths
from lmforge.model import ModelConfig, Transformer, get_preset
from lmforge.model.lora import (LoRAConfig, LoRALinear, apply_lora, find_targets, lora_modules, lora_state_dict,
                                merge_lora)
from lmforge.stages.pretrain import PretrainTask
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.train.task import Task
from lmforge.train.trainer import CheckpointSpec, TrainConfig, build_optimizer, train
from train_driver import assert_identical_runs, run_driver  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n"
TARGETS = "*_proj,lm_head"     # every projection and the (untied) head: 15 layers of 2 blocks


def _config(vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_seq_len=64,
                       tie_embeddings=False, init_std=0.1)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids)[0].float()


def _train_lora(base_dir: Path, out: Path, tok, ids: np.ndarray, **lora) -> dict:
    model, _ = lmforge.load(base_dir, device="cpu")
    task = PretrainTask(ids, ids, seq_len=32, batch_size=4, bos_id=tok.bos_id, token_bytes=token_byte_lengths(tok),
                        mode="random", eval_tokens=128, progress=False)
    cfg = TrainConfig(out_dir=str(out), max_steps=6, lr=3e-2, warmup_steps=0, weight_decay=0.0, precision="fp32",
                      progress=False, log_every=1, seed=0,
                      lora=LoRAConfig(**{"rank": 4, "alpha": 8.0, "targets": TARGETS.split(","), **lora}))
    return train(model, task, cfg, checkpoint=CheckpointSpec(model_config=model.config.to_dict(), tokenizer=tok,
                                                             generation_config={"temperature": 0},
                                                             extra={"stage": "test"}))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """base/ (a checkpoint), run/ (a LoRA run on it, 6 steps: adapters far from zero), the tokenizer, the token
    stream and a batch of ids to compare logits on."""
    d = tmp_path_factory.mktemp("lora")
    tok = Tokenizer.train([TEXT * 40], vocab_size=272 + 40, progress=False)
    torch.manual_seed(0)
    base = Transformer(_config(tok.vocab_size))
    ckpt.save(d / "base", model=base, model_config=base.config.to_dict(), tokenizer=tok)
    ids = np.array(tok.encode(TEXT * 40), dtype=np.uint16)
    _train_lora(d / "base", d / "run", tok, ids, dropout=0.1)
    probe = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    return {"dir": d, "tok": tok, "ids": ids, "probe": probe}


# ---- the layer and the wrapping ---------------------------------------------------------------------------------
def test_fresh_adapters_compute_exactly_the_base():
    torch.manual_seed(0)
    model = Transformer(_config(96))
    ids = torch.randint(0, 96, (2, 16))
    model.train()
    before = model(ids)[0].detach()
    before_eval = _logits(model, ids)
    names = apply_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    assert names == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    layer = model.get_submodule("blocks.0.attn.q_proj")
    assert isinstance(layer, LoRALinear) and layer.lora_A.abs().sum() > 0 and not layer.lora_B.any()
    model.train()
    assert torch.equal(model(ids)[0].detach(), before)          # B = 0: the update is exactly zero
    # eval mode: the wrapped projections run their own forward (not the fused base weights): same function
    assert torch.allclose(_logits(model, ids), before_eval, atol=1e-6, rtol=0)


def test_target_patterns_select_layers_by_qualified_name():
    model = Transformer(_config(96))
    assert find_targets(model, "blocks.0.*") == [f"blocks.0.{n}" for n in (
        "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj")]
    assert len(find_targets(model, "*_proj")) == 14 and "lm_head" not in find_targets(model, "*_proj")
    assert find_targets(model, "blocks.*.ffn.down_proj") == ["blocks.0.ffn.down_proj", "blocks.1.ffn.down_proj"]
    assert find_targets(model, "q_proj,v_proj") == find_targets(model, ["v_proj", "q_proj"])   # model order
    with pytest.raises(ConfigError, match="'attn_norm' matches no Linear layer") as e:
        find_targets(model, "q_proj,attn_norm")                  # a norm is not a Linear layer
    assert e.value.field == "train.lora.targets" and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="'nope' matches no Linear layer"):
        apply_lora(model, 4, targets=["nope"])
    assert not lora_modules(model)                               # nothing was wrapped on the way to the error
    tied = Transformer(ModelConfig(vocab_size=96, n_layer=1, n_head=2, d_model=16, tie_embeddings=True))
    with pytest.raises(ConfigError, match="tied embeddings"):
        find_targets(tied, "lm_head")
    apply_lora(model, 4, targets="q_proj")
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(model, 4, targets="k_proj")
    with pytest.raises(ConfigError) as e:
        LoRAConfig(rank=4, dropout=1.0)
    assert e.value.field == "dropout"


def test_only_the_adapters_get_gradients_and_the_optimizer():
    torch.manual_seed(0)
    model = Transformer(_config(96))
    names = apply_lora(model, rank=4, alpha=8, targets="*_proj")
    model.train()
    ids = torch.randint(0, 96, (2, 16))
    model(ids, targets=ids)[1].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{m}.{ab}" for m in names for ab in ("lora_A", "lora_B")}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in with_grad)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in with_grad}
    # the trainable count is r * (in + out) per layer: 14 projections of a 32-wide, 128-FFN model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shapes = [model.get_submodule(m) for m in names]
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in shapes)


def test_the_trainer_trains_and_saves_only_the_adapters(fx):
    run, base = fx["dir"] / "run" / "checkpoint", fx["dir"] / "base"
    saved = load_file(str(run / "model.safetensors"))
    assert saved and all(k.endswith((".lora_A", ".lora_B")) for k in saved)
    assert len(saved) == 2 * 15 and any(k.startswith("lm_head.") for k in saved)
    section = ckpt.read_config(run)["lora"]
    assert section["base"]["path"] == str(base.resolve())
    assert section["base"]["weights_sha256"] == ckpt.weights_hash(ckpt.read_weights(base))
    assert (section["rank"], section["alpha"], section["dropout"]) == (4, 8.0, 0.1)
    assert len(section["modules"]) == 15
    # the optimizer held exactly the adapters: one AdamW state per adapter tensor, of its shape
    opt = torch.load(run / "optimizer.pt", weights_only=True)
    n_params = sum(len(g["params"]) for g in opt["param_groups"])
    assert n_params == len(saved) == len(opt["state"])
    assert sorted(tuple(s["exp_avg"].shape) for s in opt["state"].values()) == sorted(
        tuple(t.shape) for t in saved.values())
    assert all(saved[k].abs().max() > 1e-3 for k in saved if k.endswith("lora_B"))   # B moved off zero


def test_a_task_that_trains_base_weights_is_refused(fx, tmp_path):
    class AllWeights(Task):
        def trainable(self, model):
            return list(model.named_parameters())

        def batch(self, step, micro):
            return torch.zeros(1, 4, dtype=torch.long)

        def loss(self, model, batch):
            return model(batch, targets=batch)[1], {}

    model, _ = lmforge.load(fx["dir"] / "base", device="cpu")
    cfg = TrainConfig(out_dir=str(tmp_path / "r"), max_steps=1, progress=False, precision="fp32",
                      lora=LoRAConfig(rank=2))
    with pytest.raises(ConfigError, match="only the LoRA adapters train"):
        train(model, AllWeights(), cfg, checkpoint=CheckpointSpec(model_config=model.config.to_dict()))


# ---- reloading --------------------------------------------------------------------------------------------------
def test_a_lora_run_reloads_as_base_plus_adapters(fx):
    run, probe = fx["dir"] / "run", fx["probe"]
    model, tok = lmforge.load(run, device="cpu")
    assert len(lora_modules(model)) == 15 and tok.hash() == fx["tok"].hash()
    ours = _logits(model, probe)
    base, _ = lmforge.load(fx["dir"] / "base", device="cpu")
    assert (ours - _logits(base, probe)).abs().max() > 1e-2          # the adapters matter
    # checkpoint.load into a wrapped model: base and adapters side by side; into a plain one: merged
    wrapped = Transformer(ModelConfig.from_checkpoint(run))
    apply_lora(wrapped, 4, 8.0, targets=TARGETS)
    ckpt.load(run, wrapped)
    assert torch.equal(_logits(wrapped, probe), ours)
    plain = Transformer(ModelConfig.from_checkpoint(run))
    ckpt.load(run, plain)
    assert not lora_modules(plain)
    assert (_logits(plain, probe) - ours).abs().max() < 1e-5
    # decoding goes through the adapters too (module path; the merged model takes the fast path)
    from lmforge.infer.engine import generate
    from lmforge.infer.sampling import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert generate(model, tok, "In the", params).token_ids == generate(plain, tok, "In the", params).token_ids


def test_a_changed_or_missing_base_is_a_one_line_error(fx, tmp_path, capsys):
    tok = fx["tok"]
    shutil.copytree(fx["dir"] / "base", tmp_path / "base")
    _train_lora(tmp_path / "base", tmp_path / "run", tok, fx["ids"])
    assert lmforge.load(tmp_path / "run", device="cpu")[0] is not None
    # the base is trained on (or replaced) after the LoRA run: its adapters no longer fit
    other, _ = lmforge.load(tmp_path / "base", device="cpu")
    with torch.no_grad():
        other.blocks[0].ffn.up_proj.weight[0, 0] += 1.0
    ckpt.save(tmp_path / "base", model=other, model_config=other.config.to_dict(), tokenizer=tok)
    for load in (lambda: lmforge.load(tmp_path / "run", device="cpu"),
                 lambda: ckpt.load(tmp_path / "run", Transformer(other.config))):
        with pytest.raises(CheckpointError, match="has changed since this LoRA run was trained"):
            load()
    assert main(["lora", "merge", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has changed since" in err[0] and not (tmp_path / "m").exists()
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(CheckpointError, match="base model of this LoRA run is gone"):
        lmforge.load(tmp_path / "run", device="cpu")
    # readers of full weights say what to do instead of failing on missing tensors
    assert main(["export", "hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lmforge lora merge" in err[0]


def test_a_base_changed_in_memory_before_training_is_refused(fx, tmp_path):
    model, _ = lmforge.load(fx["dir"] / "base", device="cpu")
    with torch.no_grad():
        model.norm.weight.mul_(2)                  # no longer the weights the reference would point at
    cfg = TrainConfig(out_dir=str(tmp_path / "r"), max_steps=1, progress=False, precision="fp32",
                      lora=LoRAConfig(rank=2))
    with pytest.raises(ConfigError, match="differ from those of its checkpoint"):
        train(model, Task(), cfg, checkpoint=CheckpointSpec(model_config=model.config.to_dict()))
    assert not (tmp_path / "r").exists()           # refused before the run directory was made


# ---- merge and PEFT export ---------------------------------------------------------------------------------------
def test_merge_verb_gives_the_unmerged_logits(fx, tmp_path, capsys):
    run, probe = fx["dir"] / "run", fx["probe"]
    assert main(["lora", "merge", "--checkpoint", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert "merged 15 LoRA adapters" in capsys.readouterr().out
    config = ckpt.read_config(tmp_path / "merged")
    assert "lora" not in config and config["stage"] == "test"
    assert config["merged_from"]["base"] == str((fx["dir"] / "base").resolve())
    merged_keys = set(load_file(str(tmp_path / "merged" / "model.safetensors")))
    assert merged_keys == set(load_file(str(fx["dir"] / "base" / "model.safetensors")))    # full weights
    merged, _ = lmforge.load(tmp_path / "merged", device="cpu")
    unmerged, _ = lmforge.load(run, device="cpu")
    diff = (_logits(merged, probe) - _logits(unmerged, probe)).abs().max().item()
    print(f"\nlora merge: max |logits merged - unmerged| = {diff:.2e}")
    assert diff <= 1e-5
    # merge_lora in memory: plain Linear layers again, same function
    merge_lora(unmerged)
    assert not lora_modules(unmerged) and type(unmerged.blocks[0].attn.q_proj) is torch.nn.Linear
    assert (_logits(unmerged, probe) - _logits(merged, probe)).abs().max() <= 1e-6


def test_peft_loads_our_adapter_on_our_hf_export(fx, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.interop.hf import export_hf
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, probe = fx["dir"] / "run", fx["probe"]
    assert main(["lora", "export", "--checkpoint", str(run), "--out", str(tmp_path / "adapter")]) == 0
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0
    assert "model.layers.1.mlp.down_proj" in conf["target_modules"] and "lm_head" in conf["target_modules"]
    hf_dir = export_hf(fx["dir"] / "base", tmp_path / "base-hf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        hf_base = hf(input_ids=probe).logits.float()
    with_adapter = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = with_adapter(input_ids=probe).logits.float()
    ours = _logits(lmforge.load(run, device="cpu")[0], probe)
    diff = (theirs - ours).abs().max().item()
    print(f"\nlora export: max |logits PEFT - lmforge| = {diff:.2e}")
    assert diff <= 1e-4
    assert (theirs - hf_base).abs().max() > 1e-2          # PEFT really applied the adapters


def test_a_lora_run_on_an_imported_hugging_face_model(fx, tmp_path, monkeypatch):
    """The base may be a Hugging Face directory (lmforge.load converts it): the run refers to that directory and
    comes back through lmforge.load; checkpoint.load, which reads only lmforge checkpoints, says so."""
    pytest.importorskip("transformers")
    from lmforge.interop.hf import export_hf
    hf_dir = export_hf(fx["dir"] / "base", tmp_path / "base-hf", progress=False)
    _train_lora(hf_dir, tmp_path / "run", fx["tok"], fx["ids"], targets=["q_proj", "v_proj"])
    assert ckpt.read_config(tmp_path / "run")["lora"]["base"]["path"] == str(hf_dir.resolve())
    model, _ = lmforge.load(tmp_path / "run", device="cpu")
    assert len(lora_modules(model)) == 4
    base, _ = lmforge.load(fx["dir"] / "base", device="cpu")
    apply_lora(base, 4, 8.0, targets="q_proj,v_proj")
    ckpt.load_adapters(tmp_path / "run", base)        # the same adapters on the lmforge copy of the same weights
    assert torch.equal(_logits(base, fx["probe"]), _logits(model, fx["probe"]))
    with pytest.raises(CheckpointError, match="not an lmforge checkpoint"):
        ckpt.load(tmp_path / "run", Transformer(model.config))


# ---- exact resume -----------------------------------------------------------------------------------------------
def test_kill_and_resume_of_a_lora_run_is_bitwise_identical(tmp_path):
    """The kill/resume test of tests/test_trainer.py with LoRA adapters (dropout on their input: RNG included)."""
    torch.manual_seed(0)
    mcfg = get_preset("tiny", vocab_size=VOCAB, n_layer=2, d_model=64, n_head=4, n_kv_heads=2, max_seq_len=32)
    base = Transformer(mcfg)
    ckpt.save(tmp_path / "base", model=base, model_config=mcfg.to_dict())
    run = ["max_steps=12", f"base={tmp_path / 'base'}", "lora.rank=4", "lora.dropout=0.1",
           "lora.targets=q_proj,v_proj,down_proj", "grad_accum=2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run_driver(full, *run)
    assert r.returncode == 0, r.stderr
    r = run_driver(killed, *run, "save_every=6", env={"LMFORGE_TEST_KILL_AT": "9"})
    assert r.returncode == -9, r.stderr
    assert json.loads((killed / "checkpoint" / "trainer_state.json").read_text())["step"] == 6
    r = run_driver(killed, *run, "save_every=6", "resume=true")
    assert r.returncode == 0, r.stderr
    assert_identical_runs(full, killed)          # adapters bit for bit, every logged loss
    assert all(k.endswith((".lora_A", ".lora_B")) for k in load_file(str(full / "checkpoint" / "model.safetensors")))


@pytest.mark.parametrize("lora,message", [(LoRAConfig(rank=8, alpha=8.0, targets=TARGETS.split(",")), "rank=4"),
                                          (LoRAConfig(), "trained LoRA adapters")])
def test_resuming_a_lora_run_with_other_settings_is_refused(fx, tmp_path, lora, message):
    shutil.copytree(fx["dir"] / "run", tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    model, _ = lmforge.load(fx["dir"] / "base", device="cpu")
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=8, progress=False, precision="fp32", resume=True,
                      lora=lora)
    with pytest.raises(CheckpointError, match=message):
        train(model, Task(), cfg, checkpoint=CheckpointSpec(model_config=model.config.to_dict()))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_lora_state_dict_is_the_adapters_only():
    model = Transformer(_config(96))
    apply_lora(model, 2, targets="o_proj")
    sd = lora_state_dict(model)
    assert sorted(sd) == [f"blocks.{i}.attn.o_proj.lora_{x}" for i in range(2) for x in "AB"]
    assert sd["blocks.0.attn.o_proj.lora_A"].shape == (2, 32) and sd["blocks.0.attn.o_proj.lora_B"].shape == (32, 2)
