"""Teacher forcing, the KL loss, smoke training, checkpoint/resume, evaluation, and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from srt_entmtp.spec.drafters import MedusaDrafter, create_drafter, load_drafter
from srt_entmtp.train.trainer import TeacherData, TrainConfig, evaluate, soft_kl, train


def test_teacher_hidden_states_reproduce_greedy_answers(engine, records, teacher):
    """Greedy answers were produced by argmax(LM head(h_t)): teacher forcing must give them back."""
    lm = engine.runner.model
    offs = [0]
    for r in records:
        offs.append(offs[-1] + len(r["tokens"]))
    assert teacher.tokens.tolist() == [t for r in records for t in r["tokens"]]
    hits = total = 0
    for i, r in enumerate(records):
        a = offs[i]
        if r["mode"] != "greedy":
            continue
        t = torch.arange(a + r["prompt_len"] - 1, offs[i + 1] - 1)
        pred = lm.logits(teacher.hidden[t]).argmax(-1)
        hits += int((pred == teacher.tokens[t + 1]).sum())
        total += t.numel()
    assert total >= 12 and hits / total >= 0.95
    # positions trained on: answer states only, and every one keeps a depth-1 target
    for split in ("train", "eval"):
        s = teacher.starts[split]
        assert (s + 1 <= teacher.limit[s]).all()
        seq = torch.bucketize(s, torch.tensor(offs[1:]), right=True)
        plen = torch.tensor([r["prompt_len"] for r in records])[seq]
        assert (s - torch.tensor(offs[:-1])[seq] >= plen - 1).all()
        assert {records[j]["split"] for j in seq.tolist()} == {split}


def test_soft_kl_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 50, generator=g, requires_grad=True)
    t = torch.randn(6, 50, generator=g) * 3
    w = torch.rand(6, generator=g)
    (soft_kl(z, t) * w).sum().backward()
    ours = z.grad.clone()
    z.grad = None
    ref = F.kl_div(F.log_softmax(z, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(soft_kl(z.detach(), t), ref.detach(), atol=1e-5)
    (ref * w).sum().backward()
    assert torch.allclose(ours, z.grad, atol=1e-6)


@pytest.mark.parametrize("kind", ["medusa", "hydra", "mtp"])
def test_smoke_training_lowers_the_loss(engine, records, teacher, kind):
    vocab = torch.arange(0, 49152, 16)  # compressed: keeps the CPU smoke run fast
    kw = {"medusa": {"num_heads": 3}, "hydra": {"num_heads": 3, "intermediate_size": 64},
          "mtp": {"intermediate_size": 128, "train_depth": 3}}[kind]
    d = create_drafter(kind, engine.runner, draft_vocab=vocab, **kw)
    before = evaluate(d, teacher, "train", depth=3)["loss"]
    res = train(d, teacher, TrainConfig(steps=30, batch_positions=32, depth=3, lr=3e-3, warmup=3, log_every=10),
                progress=False)
    after = evaluate(d, teacher, "train", depth=3)["loss"]
    assert after < 0.8 * before, (before, after)
    assert [h["step"] for h in res["history"]] == [1, 10, 20, 30]
    assert res["history"][-1]["loss"] < res["history"][0]["loss"]
    assert not any(p.requires_grad for p in [engine.runner.model.lm_head, engine.runner.model.embed])


def test_feature_noise_perturbs_the_heads_inputs_only_in_training(engine, teacher):
    """--feature-noise: noisy inputs give other (seeded, repeatable) losses; the teacher's targets,
    the validation loss and evaluation see clean inputs; training with it still learns."""
    from srt_entmtp.train.trainer import depth_losses, val_loss

    vocab = torch.arange(0, 49152, 16)
    d = create_drafter("mtp", engine.runner, draft_vocab=vocab, intermediate_size=64, train_depth=2)
    t = teacher.starts["train"][:32]
    g = [torch.Generator().manual_seed(5) for _ in range(2)]
    with torch.no_grad():
        clean = torch.stack(depth_losses(d, teacher, t, 2, None)[0])
        noisy = [torch.stack(depth_losses(d, teacher, t, 2, None, 0.5, g[i])[0]) for i in range(2)]
        assert torch.equal(torch.stack(depth_losses(d, teacher, t, 2, None, 0.0, g[0])[0]), clean)
    assert torch.equal(noisy[0], noisy[1]) and not torch.allclose(noisy[0], clean)
    w = torch.tensor([0.5, 0.5])
    before = val_loss(d, teacher, t, 2, w, None)
    assert before == pytest.approx(float((clean * w).sum()), rel=1e-6)  # no noise in validation
    train(d, teacher, TrainConfig(steps=30, batch_positions=32, depth=2, lr=3e-3, warmup=3, feature_noise=0.1),
          progress=False)
    assert val_loss(d, teacher, t, 2, w, None) < 0.9 * before


def test_checkpoint_resume_matches_an_uninterrupted_run(engine, teacher, tmp_path):
    vocab = torch.arange(0, 49152, 16)
    cfg = TrainConfig(steps=8, batch_positions=16, depth=2, lr=3e-3, warmup=2, ckpt_every=3, log_every=1)
    a = create_drafter("mtp", engine.runner, draft_vocab=vocab, intermediate_size=32, train_depth=2)
    train(a, teacher, cfg, progress=False)
    b = create_drafter("mtp", engine.runner, draft_vocab=vocab, intermediate_size=32, train_depth=2)
    ck = tmp_path / "ckpt" / "mtp.pt"
    train(b, teacher, cfg, ckpt_path=ck, progress=False, stop_after=5)
    assert torch.load(ck, weights_only=False)["step"] == 5
    c = create_drafter("mtp", engine.runner, draft_vocab=vocab, intermediate_size=32, train_depth=2)
    res = train(c, teacher, cfg, ckpt_path=ck, progress=False)
    assert [h["step"] for h in res["history"]] == list(range(1, 9))
    for (n, pa), pc in zip(a.named_parameters(), c.parameters()):
        assert torch.allclose(pa, pc, atol=1e-6), n
    other = create_drafter("mtp", engine.runner, draft_vocab=vocab, intermediate_size=64, train_depth=2)
    with pytest.raises(ValueError, match="checkpoint is for mtp"):
        train(other, teacher, cfg, ckpt_path=ck, progress=False)


def _constant_teacher(runner, fams=(0, 1, 1)):
    """Sequences whose hidden state never changes: the base's greedy token is the same everywhere."""
    g = torch.Generator().manual_seed(2)
    v = runner.model.final_norm * torch.randn(576, generator=g)
    L, n = 10, len(fams)
    hidden = v.repeat(n * L, 1)
    limit = torch.tensor([(i // L) * L + L - 2 for i in range(n * L)])
    family = torch.tensor([f for f in fams for _ in range(L)])
    starts = torch.cat([torch.arange(i * L + 2, i * L + L - 2) for i in range(n)])  # 6 positions a sequence
    data = TeacherData(torch.randint(0, 49152, (n * L,), generator=g), hidden, limit, family, {"eval": starts},
                       greedy=torch.tensor([i >= L for i in range(n * L)]))  # the first sequence was sampled
    return data, int(runner.model.logits(v[None])[0].argmax())


def test_evaluate_counts_hits_against_the_greedy_token(runner):
    data, greedy = _constant_teacher(runner)
    res = evaluate(MedusaDrafter(runner, num_heads=3), data)   # untrained Medusa = the LM head itself
    assert res["all"]["top1"] == [1.0, 1.0, 1.0] and res["all"]["top5"] == [1.0, 1.0, 1.0]
    # depth d is valid where t + d <= limit (starts t = 2..7, limit 8 in each sequence): 6, 5, 4
    assert res["families"]["code"]["n"] == [6, 5, 4] and res["families"]["math"]["n"] == [12, 10, 8]
    # chain acceptance: greedy sequences only (math), positions with all 3 depths valid (4 a sequence)
    assert "accept_chain_top1" not in res["families"]["code"] and res["accept_positions"] == 8
    assert res["all"]["accept_chain_top1"] == 3.0 and res["all"]["accept_tree_top5"] == 3.0
    others = torch.tensor([t for t in range(2000) if t != greedy])
    miss = evaluate(MedusaDrafter(runner, num_heads=3, draft_vocab=others), data)
    assert miss["all"]["top1"] == [0.0, 0.0, 0.0] and miss["all"]["top5"] == [0.0, 0.0, 0.0]
    assert miss["all"]["accept_chain_top1"] == 0.0
    hit = evaluate(MedusaDrafter(runner, num_heads=3, draft_vocab=torch.cat([others[:50], torch.tensor([greedy])])),
                   data)
    assert hit["all"]["top1"] == [1.0, 1.0, 1.0]


def test_cli_help_and_train_eval(engine, records, tmp_path, capsys):
    from srt_entmtp.train import cli
    from srt_entmtp.train.data import save_records

    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = tmp_path / "run"
    save_records(out / "data" / "selfdistill.pt", records, {"base_model": engine.model_name})
    rc = cli.main(["train", "--out", str(out), "--device", "cpu", "--kind", "medusa,mtp", "--steps", "4",
                   "--batch-positions", "16", "--draft-vocab", "2048", "--medusa-heads", "2", "--mtp-depth", "2",
                   "--mtp-intermediate", "64", "--teacher-tokens", "2048", "--quiet"])
    assert rc == 0
    log = json.loads((out / "train_log.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev) == {"medusa", "mtp"} and ev["mtp"]["depths"] == 2 and len(ev["medusa"]["all"]["top1"]) == 2
    assert log["medusa"]["summary"]["steps"] == 4 and log["teacher"]["tokens"] == sum(len(r["tokens"]) for r in records)
    for kind in ("medusa", "mtp"):
        h = load_drafter(out / kind, engine.runner)
        assert h.kind == kind and h.draft_vocab_size == 2048
        assert (out / kind / "model.safetensors").stat().st_size < 7 * 2**20
    assert (out / "ckpt" / "mtp.pt").is_file()
    assert "top1/top5" in capsys.readouterr().out


def test_best_validation_weights_are_kept(engine, teacher, monkeypatch):
    from srt_entmtp.train import trainer as T

    vocab = torch.arange(0, 49152, 16)
    cfg = TrainConfig(steps=8, batch_positions=16, depth=2, lr=3e-3, warmup=2, val_every=4, log_every=1)
    assert teacher.starts["val"].numel() > 0 and teacher.starts["eval"].numel() > 0
    a = create_drafter("mtp", engine.runner, draft_vocab=vocab, intermediate_size=32, train_depth=2)
    train(a, teacher, cfg, progress=False, stop_after=4)          # the weights after step 4
    scripted = iter([1.0, 2.0])                                    # val at steps 4 and 8: step 4 is best
    monkeypatch.setattr(T, "val_loss", lambda *args, **kw: next(scripted))
    b = create_drafter("mtp", engine.runner, draft_vocab=vocab, intermediate_size=32, train_depth=2)
    res = train(b, teacher, cfg, progress=False)
    assert [v["step"] for v in res["val_history"]] == [4, 8]
    assert res["summary"]["best_step"] == 4 and res["summary"]["val_loss_final"] == 2.0
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n


def test_init_heads_continue_from_trained_heads(engine, records, tmp_path, capsys):
    """`train --init-heads DIR` starts from those heads (their arch and draft vocabulary, not the
    options'), evaluates them first on the same held-out positions, and records where it began."""
    from srt_entmtp.train import cli
    from srt_entmtp.train.data import save_records

    first = tmp_path / "first"
    save_records(first / "data" / "selfdistill.pt", records, {"base_model": engine.model_name})
    common = ["--device", "cpu", "--kind", "mtp", "--batch-positions", "16", "--mtp-depth", "2",
              "--teacher-tokens", "2048", "--quiet"]
    assert cli.main(["train", "--out", str(first), "--steps", "6", "--draft-vocab", "2048",
                     "--mtp-intermediate", "64", *common]) == 0
    ev1 = json.loads((first / "eval.json").read_text())["mtp"]

    again = tmp_path / "again"
    assert cli.main(["train", "--out", str(again), "--data", str(first / "data" / "selfdistill.pt"), "--steps", "3",
                     "--draft-vocab", "4096", "--mtp-intermediate", "32", "--init-heads", str(first / "mtp"),
                     *common]) == 0
    ev2 = json.loads((again / "eval.json").read_text())
    # bf16 weights saved, loaded and evaluated the same way: the same numbers on the same positions
    assert ev2["mtp_init"]["all"] == ev1["all"] and ev2["mtp_init"]["positions"] == ev1["positions"]
    a, b = load_drafter(first / "mtp", engine.runner), load_drafter(again / "mtp", engine.runner)
    assert b.arch() == a.arch() and b.draft_vocab_size == 2048 and torch.equal(a.draft_vocab, b.draft_vocab)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # it did train
    cfg = json.loads((again / "mtp" / "config.json").read_text())
    assert cfg["training"]["init_from"]["heads"] == str(first / "mtp") and cfg["training"]["steps"] == 3
    assert "before training" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="--kind is medusa"):
        cli.main(["train", "--out", str(tmp_path / "bad"), "--data", str(first / "data" / "selfdistill.pt"),
                  "--steps", "1", "--init-heads", str(first / "mtp"),
                  *[x if x != "mtp" else "medusa" for x in common]])
    with pytest.raises(SystemExit, match="--init-heads: .*config.json: not found"):  # before any data is read
        cli.main(["train", "--out", str(tmp_path / "bad"), "--data", str(tmp_path / "none.pt"), "--init-heads",
                  str(tmp_path / "no_heads"), *common])
