"""The Task hooks as the one training loop calls them: defaults, a trainable subset, frozen modules, before_step,
and PretrainTask's loss through the model's own path."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmforge import checkpoint as ckpt
from lmforge.errors import ConfigError
from lmforge.model.config import get_preset
from lmforge.model.transformer import Transformer
from lmforge.stages.pretrain import PretrainTask
from lmforge.train.task import Task
from lmforge.train.trainer import CheckpointSpec, TrainConfig, train

SPEC = CheckpointSpec(model_config={"kind": "mlp"})


def config(tmp_path, **kw) -> TrainConfig:
    values = dict(out_dir=str(tmp_path), max_steps=6, lr=0.05, warmup_steps=0, weight_decay=0.0, precision="fp32",
                  progress=False, log_every=1, device="cpu")
    return TrainConfig(**{**values, **kw})


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


class Fit(Task):
    """Fit a fixed random target with an MSE loss: the smallest task, defaults for everything else."""

    def batch(self, step, micro):
        g = torch.Generator().manual_seed(step * 100 + micro)
        x = torch.randn(16, 4, generator=g)
        return x, x.sum(-1, keepdim=True).sin()

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y), {"tokens": len(x)}


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def optimizer_numels(run_dir) -> list[int]:
    """The sizes of the tensors the saved AdamW state holds moments for, sorted."""
    _, opt = ckpt.load_trainer_state(run_dir / "checkpoint")
    return sorted(opt["state"][i]["exp_avg"].numel() for g in opt["param_groups"] for i in g["params"])


def numels(params) -> list[int]:
    return sorted(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------------------------
# (e) the base class: documented defaults, the two required hooks

def test_base_class_defaults():
    t, model = Task(), mlp()
    assert t.setup(model, torch.device("cpu")) is None
    assert t.before_step(model, 0) is None
    assert t.trainable(model) is None
    assert t.frozen_modules() == {}
    assert t.evaluate(model) == {} and t.evaluate(model, final=True) == {}
    assert t.samples(model) == []
    assert t.state_dict() == {}
    assert t.load_state_dict({"anything": 1}) is None
    with pytest.raises(NotImplementedError, match="batch"):
        t.batch(0, 0)
    with pytest.raises(NotImplementedError, match="loss"):
        t.loss(model, None)


def test_a_task_with_only_batch_and_loss_trains_every_parameter(tmp_path):
    model = mlp()
    before = snapshot(model)
    summary = train(model, Fit(), config(tmp_path), checkpoint=SPEC)
    assert summary["step"] == 6 and "val_loss" not in summary
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer_numels(tmp_path) == numels(model.parameters())
    # the checkpoint's task state is the default's
    state, _ = ckpt.load_trainer_state(tmp_path / "checkpoint")
    assert state["task"] == {}


# ---------------------------------------------------------------------------------------------------------------
# (a) trainable(): only a subset trains

class LastLayerOnly(Fit):
    def trainable(self, model):
        return model[2].named_parameters()


def test_only_the_trainable_subset_changes_and_is_optimised(tmp_path):
    model = mlp()
    before = snapshot(model)
    train(model, LastLayerOnly(), config(tmp_path), checkpoint=SPEC)
    after = model.state_dict()
    for k in ("0.weight", "0.bias"):
        assert torch.equal(before[k], after[k]), k              # bitwise untouched
        assert not model.get_parameter(k).requires_grad
    for k in ("2.weight", "2.bias"):
        assert not torch.equal(before[k], after[k]), k
    assert optimizer_numels(tmp_path) == [1, 8]                 # the optimizer holds exactly layer 2
    # the checkpoint still holds the whole model (resume loads it strictly)
    assert set(load_file(str(tmp_path / "checkpoint" / "model.safetensors"))) == set(after)


def test_trainable_subset_resumes(tmp_path):
    # constant lr: the 3-step first half then follows the same schedule as the 6-step run
    train(mlp(), LastLayerOnly(), config(tmp_path, max_steps=3, schedule="constant"), checkpoint=SPEC)
    model = mlp()
    train(model, LastLayerOnly(), config(tmp_path, max_steps=6, schedule="constant", resume=True), checkpoint=SPEC)
    uninterrupted = mlp()
    train(uninterrupted, LastLayerOnly(), config(tmp_path / "u", schedule="constant"), checkpoint=SPEC)
    for k, v in uninterrupted.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_trainable_must_name_the_models_own_parameters(tmp_path):
    class Foreign(Fit):
        def trainable(self, model):
            return [("stray", nn.Parameter(torch.zeros(3)))]

    class Nothing(Fit):
        def trainable(self, model):
            return []

    with pytest.raises(ConfigError, match="stray"):
        train(mlp(), Foreign(), config(tmp_path), checkpoint=SPEC)
    with pytest.raises(ConfigError, match="no parameter"):
        train(mlp(), Nothing(), config(tmp_path), checkpoint=SPEC)


# ---------------------------------------------------------------------------------------------------------------
# (b) frozen_modules(): a teacher rides along, frozen

class RecordingLinear(nn.Linear):
    """Remembers where `.to()` sent it, so the test sees the trainer moved it even when the device is the CPU."""
    moved_to = None

    def to(self, *args, **kwargs):
        self.moved_to = torch.device(args[0]) if args else kwargs.get("device")
        return super().to(*args, **kwargs)


class Distill(Fit):
    def __init__(self):
        torch.manual_seed(1)
        self.teacher = RecordingLinear(4, 1)   # left in train mode with requires_grad: the trainer must freeze it
        self.modes = []

    def frozen_modules(self):
        return {"teacher": self.teacher}

    def loss(self, model, batch):
        x, _ = batch
        self.modes.append((self.teacher.training, any(p.requires_grad for p in self.teacher.parameters())))
        return F.mse_loss(model(x), self.teacher(x)), {"tokens": len(x)}


def test_a_frozen_module_is_on_the_device_in_eval_mode_and_never_trained_or_saved(tmp_path):
    task, model = Distill(), mlp()
    teacher_before = snapshot(task.teacher)
    train(model, task, config(tmp_path), checkpoint=SPEC)
    assert task.teacher.moved_to == torch.device("cpu")
    assert task.modes and set(task.modes) == {(False, False)}   # eval mode, frozen, at every loss call
    assert not task.teacher.training
    for k, v in task.teacher.state_dict().items():
        assert torch.equal(teacher_before[k], v), k
    assert optimizer_numels(tmp_path) == numels(model.parameters())   # no teacher tensor in there
    saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert set(saved) == set(model.state_dict())                # the checkpoint holds the student only


def test_a_frozen_module_may_not_share_the_models_parameters(tmp_path):
    class Shared(Fit):
        def __init__(self, model):
            self.model = model

        def frozen_modules(self):
            return {"head": self.model[2]}

    model = mlp()
    with pytest.raises(ConfigError, match="head"):
        train(model, Shared(model), config(tmp_path), checkpoint=SPEC)


# ---------------------------------------------------------------------------------------------------------------
# (c) before_step(): once per step, before that step's batches, with the weights of the previous step

class Rollouts(Fit):
    def __init__(self):
        self.events = []

    def setup(self, model, device):
        self.events.append(("setup", None))
        self.model = model

    def before_step(self, model, step):
        # what an RL task sees when it generates rollouts
        assert model is self.model and not model.training and not torch.is_grad_enabled()
        self.events.append(("before_step", step, model[2].weight.detach().clone()))

    def batch(self, step, micro):
        self.events.append(("batch", step, micro))
        return super().batch(step, micro)

    def loss(self, model, batch):
        assert model.training
        self.events.append(("loss", self.model[2].weight.detach().clone()))
        return super().loss(model, batch)


def test_before_step_runs_once_per_step_before_its_batches_with_the_updated_weights(tmp_path):
    task, model = Rollouts(), mlp()
    train(model, task, config(tmp_path, max_steps=4, grad_accum=2), checkpoint=SPEC)
    kinds = [(e[0], e[1]) if e[0] != "loss" else ("loss",) for e in task.events]
    expected = [("setup", None)]
    for step in range(4):
        expected += [("before_step", step), ("batch", step), ("loss",), ("batch", step), ("loss",)]
    assert kinds == expected
    seen = [e[2] for e in task.events if e[0] == "before_step"]
    in_loss = [e[1] for e in task.events if e[0] == "loss"][::2]   # the first micro-batch of each step
    for step in range(4):
        assert torch.equal(seen[step], in_loss[step])              # the weights the step then trains from
        if step:
            assert not torch.equal(seen[step], seen[step - 1])     # ... which the previous step had updated
    assert not torch.equal(seen[-1], model[2].weight)


# ---------------------------------------------------------------------------------------------------------------
# PretrainTask: the loss is the model's own, unchanged from an explicit cross-entropy

def test_pretrain_loss_is_the_models_cross_entropy():
    vocab, bos = 32, 31
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=vocab, n_layer=1, d_model=32, n_head=2, n_kv_heads=1,
                                   max_seq_len=16))
    tokens = torch.randint(0, bos, (600,)).numpy().astype("uint16")
    tokens[::50] = bos
    task = PretrainTask(tokens, tokens[:100], seq_len=16, batch_size=4, bos_id=bos,
                        token_bytes=torch.ones(vocab, dtype=torch.int64).numpy(), progress=False)
    x, y, mask = task.batch(3, 0)
    assert mask is None and x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    loss, info = task.loss(model, (x, y, mask))
    logits, _ = model(x)
    explicit = F.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1))
    assert abs(loss.item() - explicit.item()) < 1e-6
    assert info == {"tokens": 64}
    # a mask (what SFT adds) weights the same per-token losses: zero out half of each row
    half = torch.zeros_like(y, dtype=torch.bool)
    half[:, 8:] = True
    masked, _ = task.loss(model, (x, y, half))
    per_tok = F.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1), reduction="none").view(y.shape)
    assert abs(masked.item() - per_tok[:, 8:].mean().item()) < 1e-6
