"""The train stage on a tiny model: adapter, MLflow tracking, prompt masking, resume."""

from __future__ import annotations

import json

import pytest
import torch

import mlflow
from pipelines.config import TrainConfig, load_params
from pipelines.data.records import read_jsonl
from pipelines.model import batches, devices, loop, train
from pipelines.model.base import load_base
from pipelines.model.loss import completion_loss

# params.yaml's training block with what a 2-layer model on 20 examples needs instead.
CFG = load_params().train.model_dump() | dict(
    lora_r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    weight_decay=0.0,
    batch_size=4,
    max_steps=4,
    precision="fp32",
    log_every=1,
    checkpoint_every=2,
    dev_examples=1,
    eval_every=2,
    schema_augment=0.0,
    schema_variants=0,
    feedback_repeat=1,
)


def _run(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, **overrides):
    cfg = TrainConfig(**{**CFG, **overrides})
    return train.run(
        cfg, 0, tiny_base_dir, prepared_dir, tmp_path / "adapter", tmp_path / "ckpt", mlflow_cfg
    )


def test_collate_masks_the_prompt():
    batch = batches.collate(
        [batches.Example([5, 6, 7, 8], 3), batches.Example([9, 10], 1)], pad_id=0
    )
    assert batch["labels"].tolist() == [[-100, -100, -100, 8], [-100, 10, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert int(batch["prefix_len"]) == 0


def test_shared_prefix_stops_before_the_last_prompt_token():
    a, b = batches.Example([1, 2, 3, 4, 9], 4), batches.Example([1, 2, 3, 5, 6, 7], 5)
    assert batches.shared_prefix_len([a, b]) == 3
    assert batches.shared_prefix_len([a, batches.Example([1, 2, 3, 4, 8], 4)]) == 3  # not 4
    assert batches.shared_prefix_len([a, batches.Example([7, 2], 1)]) == 0


@pytest.mark.parametrize("base", ["tiny_base_dir", "tiny_gemma_dir"])
def test_fast_loss_equals_the_full_computation(base, prepared_dir, request):
    """Shared-prefix + SQL-position loss is exact: same value and same LoRA gradients as
    transformers' own loss over full sequences, for Llama (SmolLM2) and for Gemma 3, whose
    sliding-window layers keep only the last 16 tokens of the shared prefix's cache here."""
    from peft import LoraConfig, get_peft_model

    model, tok = load_base(request.getfixturevalue(base))
    model = get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    examples, _, _ = batches.tokenize(read_jsonl(prepared_dir / "train.jsonl"), tok, 512)
    batch = batches.collate(examples[:4], tok.pad_token_id)  # one database: a long shared prefix
    assert int(batch["prefix_len"]) > 50
    fast, n = completion_loss(model, batch)
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    reference = model(**plain).loss  # transformers' own shifted loss over the same labels
    reference.backward()
    ref_grads = [p.grad for p in model.parameters() if p.requires_grad]
    full, _ = completion_loss(model, batch, full_logits=True)
    assert n > 0
    assert torch.allclose(fast, reference, atol=1e-5) and torch.allclose(full, reference, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast_grads, ref_grads, strict=True))


def test_adapters_go_on_the_top_layers_the_share_names(tiny_base_dir):
    """lora_layer_share 0.5 of the tiny model's 2 layers: the same linear modules as
    all-linear, on layer 1 only; a share outside (0, 1] is refused."""
    from peft import get_peft_model

    def trainable(share: float) -> set[str]:
        model, _ = load_base(tiny_base_dir)
        cfg = TrainConfig(**{**CFG, "lora_layer_share": share})
        peft_model = get_peft_model(model, devices.lora_config(cfg, model))
        return {n for n, p in peft_model.named_parameters() if p.requires_grad}

    everywhere, top = trainable(1.0), trainable(0.5)
    assert {n for n in everywhere if ".layers.1." in n} == top
    assert top and len(everywhere) == 2 * len(top)
    model, _ = load_base(tiny_base_dir)
    with pytest.raises(ValueError, match="lora_layer_share"):
        devices.lora_config(TrainConfig(**{**CFG, "lora_layer_share": 0.0}), model)


def test_dev_split_is_seeded_disjoint_and_capped():
    records = [{"id": i} for i in range(50)]
    train_part, dev = batches.split_dev(records, 8, seed=3)
    assert len(dev) == 5 and len(train_part) == 45  # capped at a tenth
    assert {r["id"] for r in dev}.isdisjoint(r["id"] for r in train_part)
    assert dev == batches.split_dev(records, 8, seed=3)[1]
    assert batches.split_dev(records, 0, seed=3) == (records, [])


@pytest.mark.parametrize(
    "history, patience, stop",
    [
        ([1.0, 0.9, 0.8], 2, False),
        ([1.0, 0.9, 0.95, 0.91], 2, True),
        ([1.0, 0.9, 0.95, 0.85], 2, False),
        ([1.0, 1.1, 1.2], 0, False),  # 0 = off
        ([1.0], 1, False),
    ],
)
def test_early_stopping(history, patience, stop):
    assert loop.should_stop(history, patience) is stop


def test_batch_schedule_is_deterministic_and_one_database_per_batch():
    groups = ["shop", "game", "shop", "game", "shop", "game", "shop", "game"]
    a = batches.batch_schedule(groups, 4, 6, seed=1)
    assert a == batches.batch_schedule(groups, 4, 6, seed=1)
    assert len(a) == 6 and all(len(b) == 4 for b in a)
    assert all(len({groups[i] for i in b}) == 1 for b in a)


def test_prepare_examples_gives_one_schema_per_batch_on_a_seeded_schedule(
    tiny_base_dir, prepared_dir
):
    cfg = TrainConfig(**{**CFG, "grad_accum": 2, "schema_augment": 1.0, "schema_variants": 2})
    _, tok = load_base(tiny_base_dir)
    data = batches.prepare_examples(cfg, 0, prepared_dir, tok)
    assert len(data.dev) == 1 and data.dropped == 0
    assert len(data.examples) == len(read_jsonl(prepared_dir / "train.jsonl")) - 1
    assert len(data.schedule) == cfg.max_steps * cfg.grad_accum
    # Two renamed schemas part inside the DDL; a batch of one schema shares all of it.
    common = batches.shared_prefix_len(data.examples)
    for b in (b for b in data.schedule if len(b) > 1):
        assert batches.shared_prefix_len([data.examples[i] for i in b]) > common
    assert data == batches.prepare_examples(cfg, 0, prepared_dir, tok)


def test_train_loop_alone_returns_its_history(tiny_base_dir, prepared_dir):
    cfg = TrainConfig(**{**CFG, "max_steps": 3})
    where = devices.place(cfg)
    net = loop.build_model_and_optimizer(cfg, tiny_base_dir, where.device)
    data = batches.prepare_examples(cfg, 0, prepared_dir, net.tok)
    logged, saved = [], []
    history = loop.train_loop(
        cfg,
        net,
        data,
        where,
        loop.History(),
        log_metrics=lambda metrics, step: logged.append((step, sorted(metrics))),
        checkpoint=lambda h: saved.append(h.step),
    )
    assert history.step == 3 and len(history.losses) == 3
    assert len(history.eval_losses) == 2  # every eval_every=2 steps and at the end
    assert history.tokens > 0 and history.tokens_per_s > 0
    assert saved == [2]  # checkpoint_every=2; none at the last step
    train_metrics = ["grad_norm", "learning_rate", "tokens_per_s", "train_loss"]
    assert [s for s, m in logged if m == train_metrics] == [1, 2, 3]
    assert [s for s, m in logged if m == ["eval_loss"]] == [2, 3]


def test_the_budget_keeps_the_steps_that_fit_and_never_adds_any():
    cfg = TrainConfig(**{**CFG, "max_steps": 100, "max_minutes": 1.0})
    # 4 steps in 16 s, the last three took 12 s: 4 s/step, 44 s left -> 11 more.
    assert loop.steps_in_budget(cfg, 4, 4, 16.0, 12.0) == 15
    assert loop.steps_in_budget(cfg, 4, 4, 1.0, 0.3) == 100  # fast: max_steps
    assert loop.steps_in_budget(cfg, 4, 4, 70.0, 60.0) == 4  # over budget: it ends now
    assert loop.steps_in_budget(cfg, 3, 3, 50.0, 40.0) == 100  # too few steps measured yet
    assert loop.steps_in_budget(cfg, 24, 4, 16.0, 12.0) == 35  # resumed at step 20
    assert loop.steps_in_budget(cfg.model_copy(update={"max_minutes": 0}), 4, 4, 1e6, 1e6) == 100


def test_a_budget_too_small_for_max_steps_ends_the_schedule_early(tiny_base_dir, prepared_dir):
    cfg = TrainConfig(**{**CFG, "max_steps": 50, "max_minutes": 1e-6, "eval_every": 100})
    where = devices.place(cfg)
    net = loop.build_model_and_optimizer(cfg, tiny_base_dir, where.device)
    data = batches.prepare_examples(cfg, 0, prepared_dir, net.tok)
    lrs = []
    history = loop.train_loop(
        cfg, net, data, where, loop.History(),
        log_metrics=lambda m, step: "learning_rate" in m and lrs.append(m["learning_rate"]),
    )  # fmt: skip
    assert history.step == history.planned_steps == 4  # three measured, then over budget
    assert net.sched.lr_lambdas[0](4) == 0.0  # the decay now ends at step 4, not at step 50
    assert lrs[-1] > 0  # (it was planned for 50 when step 4 ran)
    assert len(history.eval_losses) == 1  # the last step's


@pytest.mark.slow
def test_train_writes_adapter_and_tracks_run(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg):
    info = _run(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "adapter" / "train_info.json").read_text())["steps"] == 4
    assert not (tmp_path / "ckpt").exists()  # cleaned after a finished run
    run = mlflow.get_run(info["run_id"])
    assert run.data.params["lora_r"] == "4"
    assert {"git_commit", "data_hash", "base_model", "base_model_hash"} <= set(run.data.tags)
    client = mlflow.tracking.MlflowClient()
    assert [m.step for m in client.get_metric_history(info["run_id"], "train_loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(info["run_id"], "eval_loss")] == [2, 4]
    assert run.data.params["n_dev"] == "1" and info["eval_loss"] > 0
    model, _ = load_base(tiny_base_dir, tmp_path / "adapter")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_interrupted_training_resumes(
    tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg, monkeypatch
):
    reference = _run(tmp_path / "ref", tiny_base_dir, prepared_dir, mlflow_cfg)
    ref_losses = json.loads((tmp_path / "ref" / "adapter" / "train_info.json").read_text())

    real_save = train._save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # as if killed right after the checkpoint at step 2

    monkeypatch.setattr(train, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg)
    assert (tmp_path / "ckpt" / "state.pt").is_file()
    monkeypatch.setattr(train, "_save_checkpoint", real_save)
    resumed = _run(tmp_path, tiny_base_dir, prepared_dir, mlflow_cfg)
    assert resumed["steps"] == 4
    assert resumed["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-4)
    assert resumed["loss_first_10"] == pytest.approx(ref_losses["loss_first_10"], rel=1e-4)
    assert resumed["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-4)
    history = mlflow.tracking.MlflowClient().get_metric_history(resumed["run_id"], "train_loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4]  # one run, curve continues


def test_feedback_examples_are_repeated_in_the_training_pool():
    from pipelines.model.batches import repeat_feedback

    records = [{"id": "s", "source": "synthetic"}, {"id": "f", "source": "feedback"}]
    assert [r["id"] for r in repeat_feedback(records, 3)] == ["s", "f", "f", "f"]
    assert repeat_feedback(records, 1) == records
