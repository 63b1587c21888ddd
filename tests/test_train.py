"""Training end to end on CPU: the smoke config trains, logs, checkpoints atomically, resumes
exactly and exports a Hugging Face directory; DeepSpeed ZeRO-2 and ZeRO-3 with two processes do
the same; every config file parses."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

import zeros_lm  # noqa: F401  (registers the Auto classes)
from zeros_lm import ZeroSForCausalLM
from zeros_lm.cli import train  # what train.py and zeros-lm train run
from zeros_lm.strategies import SHARED_MEMORY_COMM_OP
from zeros_lm.training import AtomicCheckpointIO, ZeroSLitModule, lr_lambda

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"




@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One data cache for the whole session: the first run tokenises, the others load."""
    return str(tmp_path_factory.mktemp("zeros_cache"))


def smoke_args(root: Path, cache: str, *extra: str) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "smoke.yaml"),
        "--trainer.default_root_dir",
        str(root),
        "--data.cache_dir",
        cache,
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


class LossRecorder(Callback):
    def __init__(self, stop_at: int | None = None):
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True  # a graceful interruption (as on SIGTERM)


def run_in_process(args: list[str], stop_at: int | None = None):
    saved, sys.argv = sys.argv, ["train.py"]
    try:
        cli = train.make_cli(args)
    finally:
        sys.argv = saved
    recorder = LossRecorder(stop_at)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    return cli, recorder.losses


def read_metrics(root: Path) -> list[dict]:
    rows = []
    for f in sorted(root.glob("logs/version_*/metrics.csv")):
        with open(f) as fh:
            rows.extend(csv.DictReader(fh))
    return rows


def column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids, use_cache=False).logits.float()


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------
def print_config(args: list[str], capsys) -> str:
    saved, sys.argv = sys.argv, ["train.py"]
    try:
        with pytest.raises(SystemExit) as e:
            train.make_cli(args + ["--print_config"])
    finally:
        sys.argv = saved
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def test_every_config_parses_and_default_yaml_is_the_embedded_default(capsys):
    embedded = print_config([], capsys)
    assert print_config(["--config", str(CONFIGS / "default.yaml")], capsys) == embedded
    for name in ["smoke", "small", "zero2", "zero3", "zero3_offload", "ddp"]:
        out = print_config(["--config", str(CONFIGS / f"{name}.yaml")], capsys)
        assert "model:" in out and "trainer:" in out
    layered = print_config(["--config", str(CONFIGS / "small.yaml"), "--config", str(CONFIGS / "zero3.yaml")], capsys)
    assert "deepspeed_stage_3" in layered and "hidden_size: 768" in layered
    dotted = print_config(["--trainer.max_steps", "7", "--data.seq_len", "99", "--model.hidden_size", "96"], capsys)
    assert "max_steps: 7" in dotted and "seq_len: 99" in dotted and "hidden_size: 96" in dotted


def test_small_config_is_about_125m_parameters():
    import yaml

    from zeros_lm import ZeroSConfig

    model_cfg = yaml.safe_load((CONFIGS / "small.yaml").read_text())["model"]
    data_cfg = yaml.safe_load((CONFIGS / "small.yaml").read_text())["data"]
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    cfg = ZeroSConfig(vocab_size=data_cfg["tokenizer_vocab_size"], **{k: model_cfg[k] for k in keys if k in model_cfg})
    with torch.device("meta"):
        n = sum(p.numel() for p in ZeroSForCausalLM(cfg).parameters())
    assert 100e6 < n < 150e6, n


def test_bad_input_is_one_clear_error_before_training(tmp_path, cache_dir, capsys):
    sys_argv, sys.argv = sys.argv, ["train.py"]
    code = train.main(smoke_args(tmp_path / "run", cache_dir, "--data.train_files", str(tmp_path / "missing")))
    sys.argv = sys_argv
    assert code == 2
    err = capsys.readouterr().err
    assert "error: no such file or directory" in err and "missing" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------
# Optimiser pieces
# ------------------------------------------------------------------------------------------
def test_warmup_then_cosine():
    assert lr_lambda(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_lambda(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert lr_lambda(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_lambda(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_embeddings():
    module = ZeroSLitModule(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert not any("norm" in n or "embed" in n or n.endswith("bias") for n in decayed)
    assert all(p.ndim >= 2 for p in decay["params"])
    n_all = sum(p.numel() for p in module.model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_all


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients():
    torch.manual_seed(0)
    kw = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, chunk_size=8)
    plain = ZeroSLitModule(**kw)
    ckpt = ZeroSLitModule(**kw, gradient_checkpointing=True)
    ckpt.model.load_state_dict(plain.model.state_dict())
    batch = torch.randint(0, 300, (2, 33))
    grads, recomputed = [], []
    for m in (plain, ckpt):
        m.train()
        calls = {"n": 0}
        for block in m.model.model.layers:  # counts every run of a block's MLP, recomputations included
            block.mlp.forward = _counted(block.mlp.forward, calls)
        loss = m._loss(batch)
        forward = calls["n"]
        loss.backward()
        recomputed.append(calls["n"] - forward)
        grads.append(torch.cat([p.grad.flatten() for p in m.model.parameters() if p.grad is not None]))
    assert recomputed == [0, kw["num_hidden_layers"]]  # the option really turns checkpointing on
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _counted(fn, calls: dict):
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        return fn(*args, **kwargs)

    return wrapper


def test_atomic_checkpoint_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, fh, *a, **k):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ------------------------------------------------------------------------------------------
# Single-process smoke run
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("smoke")
    cli, losses = run_in_process(smoke_args(root, cache_dir))
    return root, cli, losses


def test_smoke_run_trains_logs_and_keeps_the_last_checkpoints(smoke_run):
    root, cli, losses = smoke_run
    assert cli.trainer.global_step == 20
    first, last = losses[1], sum(losses[k] for k in (18, 19, 20)) / 3
    assert last < first - 0.3, losses
    rows = read_metrics(root)
    for key in ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "tok_s", "val/loss", "val/ppl"):
        values = column(rows, key)
        assert values and all(math.isfinite(v) for v in values), key
    assert column(rows, "val/ppl")[-1] == pytest.approx(math.exp(column(rows, "val/loss")[-1]), rel=1e-4)
    lrs = column(rows, "train/lr")
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)  # warmup, then decay
    assert list(root.glob("logs/version_*/events.out.tfevents.*")), "TensorBoard log"
    ckpts = root / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=0000010.ckpt", "step=0000020.ckpt"]
    assert os.path.realpath(ckpts / "last.ckpt") == str((ckpts / "step=0000020.ckpt").resolve())


def test_smoke_run_exports_a_loadable_hf_directory(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    root, cli, _ = smoke_run
    hf = root / "hf"
    for name in ("model.safetensors", "config.json", "modeling_zeros.py", "tokenizer.json", "generation_config.json"):
        assert (hf / name).is_file(), name
    config = json.loads((hf / "config.json").read_text())
    assert "auto_map" in config and config["vocab_size"] == len(cli.datamodule.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(hf)
    ids = torch.randint(0, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(model, ids), logits_of(cli.model.model, ids), rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.decode(tok("import os\n")["input_ids"]) == "import os\n"
    gen = GenerationConfig.from_pretrained(hf)
    assert gen.eos_token_id == tok.eos_token_id
    check = json.loads((root / "export_check.json").read_text())
    assert check["max_abs_diff"] < 1e-5
    prompt = torch.tensor([tok("import ")["input_ids"]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    expected = prompt  # greedy decoding by full forwards: argmax of the last position, until EOS
    while expected.shape[1] < prompt.shape[1] + 5:
        token = logits_of(model, expected)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, token], dim=1)
        if token.item() == tok.eos_token_id:
            break
    assert torch.equal(out, expected)


def test_export_command_on_a_plain_checkpoint(smoke_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from zeros_lm import export

    root, cli, _ = smoke_run
    out = tmp_path / "from_ckpt"
    assert export.main([str(root / "checkpoints" / "step=0000010.ckpt"), str(out)]) == 0
    mid = AutoModelForCausalLM.from_pretrained(out)
    state = torch.load(root / "checkpoints" / "step=0000010.ckpt", weights_only=False)["state_dict"]
    reference = ZeroSForCausalLM(mid.config)
    reference.load_state_dict({k[len("model.") :]: v for k, v in state.items()}, strict=False)
    reference.tie_weights()
    ids = torch.randint(0, mid.config.vocab_size, (1, 24))
    torch.testing.assert_close(logits_of(mid, ids), logits_of(reference, ids), rtol=0, atol=1e-6)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert export.main([str(root / "nope.ckpt"), str(tmp_path / "x")]) == 2  # misuse, as every zeros-lm command (#25)


def test_export_options_dtype_tokenizer_and_no_check(smoke_run, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from zeros_lm import export

    root, cli, _ = smoke_run
    ckpt = root / "checkpoints" / "step=0000020.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    # --dtype bfloat16: the checkpoint's weights, rounded to bfloat16, and a check that passes
    assert export.main([str(ckpt), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert "Reloaded with from_pretrained" in capsys.readouterr().out
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    assert stored and {t.dtype for t in stored.values()} == {torch.bfloat16}
    for key, tensor in stored.items():
        assert torch.equal(tensor, state["model." + key].to(torch.bfloat16)), key
    # --tokenizer DIR replaces the checkpoint's tokenizer; --no-check never reloads the export
    tok = AutoTokenizer.from_pretrained(root / "hf")
    tok.model_max_length = 4321  # marks this copy
    tok.save_pretrained(tmp_path / "tok")

    def no_reload(*args, **kwargs):
        raise AssertionError("--no-check must not reload the export")

    monkeypatch.setattr(export, "compare_logits", no_reload)
    assert export.main([str(ckpt), str(tmp_path / "tok_out"), "--tokenizer", str(tmp_path / "tok"), "--no-check"]) == 0
    assert "Reloaded" not in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(tmp_path / "tok_out").model_max_length == 4321
    assert {t.dtype for t in load_file(tmp_path / "tok_out" / "model.safetensors").values()} == {torch.float32}


def test_init_from_an_exported_directory_continues_training(smoke_run, tmp_path, cache_dir):
    root, cli, losses = smoke_run
    _, cont = run_in_process(
        smoke_args(tmp_path / "cont", cache_dir, "--model.init_from", str(root / "hf"), "--trainer.max_steps", "2",
                   "--export.enabled", "false")
    )
    assert cont[1] < losses[1] - 0.3  # starts from the trained weights, not from scratch


def test_resume_from_last_ends_where_an_uninterrupted_run_ends(tmp_path, cache_dir):
    # 12 steps of 32 sequences cross an epoch boundary (609 blocks -> 19 batches per epoch) ...
    extra = ("--data.batch_size", "32", "--trainer.max_steps", "24", "--export.enabled", "false",
             "--trainer.val_check_interval", "100")
    _, whole = run_in_process(smoke_args(tmp_path / "a", cache_dir, *extra))
    # ... stopped midway (not on a checkpoint step), then resumed with --ckpt_path last.
    _, first = run_in_process(smoke_args(tmp_path / "b", cache_dir, *extra), stop_at=13)
    assert max(first) == 13
    _, second = run_in_process(smoke_args(tmp_path / "b", cache_dir, *extra, "--ckpt_path", "last"))
    assert min(second) == 14 and max(second) == 24
    for step in range(14, 25):
        assert second[step] == pytest.approx(whole[step], abs=1e-5), step
    assert second[24] == pytest.approx(whole[24], abs=1e-6)
    # The throughput logger's token count goes on from the checkpoint: 24 batches of 32 x 64 tokens.
    tokens = 24 * 32 * smoke_seq_len()
    assert column(read_metrics(tmp_path / "b"), "train/tokens")[-1] == column(read_metrics(tmp_path / "a"), "train/tokens")[-1] == tokens


def smoke_seq_len() -> int:
    import yaml

    return int(yaml.safe_load((CONFIGS / "smoke.yaml").read_text())["data"]["seq_len"])


# ------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2 / ZeRO-3, two processes on CPU
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def torch_extensions_dir(tmp_path_factory) -> Path:
    """DeepSpeed's ops (CPU Adam) are built for this session alone: the tests neither depend on nor
    leave anything in the user's build cache (where a killed build's lock would stall later runs)."""
    path = tmp_path_factory.mktemp("torch_extensions")
    previous = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("TORCH_EXTENSIONS_DIR", None)
    else:
        os.environ["TORCH_EXTENSIONS_DIR"] = previous


def run_script(args: list[str], timeout: int = 240, expect_rc: int = 0) -> subprocess.CompletedProcess:
    """train.py in a session of its own: on a timeout the whole process group (the ranks Lightning
    launched included) is killed, so that nothing is left running for the tests that follow."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    with subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"train.py did not finish in {timeout} s:\n{out[-3000:]}{err[-6000:]}")
    assert proc.returncode == expect_rc, out[-3000:] + err[-6000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_train_checkpoint_resume_export(stage, tmp_path, cache_dir, torch_extensions_dir):
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    from transformers import AutoModelForCausalLM

    def args_for(root: Path) -> list[str]:
        return smoke_args(
            root,
            cache_dir,
            "--trainer.devices", "2",
            "--trainer.strategy", f"deepspeed_stage_{stage}",
            "--checkpoint.every_n_train_steps", "4",
            "--trainer.val_check_interval", "4",
            "--model.lr_decay_steps", "12",
        )

    root = tmp_path / f"zero{stage}"
    common = args_for(root)
    run_script(common + ["--trainer.max_steps", "8", "--export.enabled", "false"])
    # DeepSpeed's shared-memory collectives op (unused under Lightning) was not compiled.
    assert not (torch_extensions_dir / SHARED_MEMORY_COMM_OP).exists()
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "checkpoint").is_dir(), "a sharded DeepSpeed checkpoint"
    assert not list((root / "checkpoints").glob("*.partial"))
    proc = run_script(common + ["--trainer.max_steps", "12", "--ckpt_path", "last"])
    assert "Restored all states" in proc.stdout + proc.stderr
    assert f"python generate.py {root / 'hf'}" in proc.stdout

    rows = read_metrics(root)
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert sorted(set(steps)) == list(range(12)), steps  # resumed at step 8, not from scratch
    losses = column(rows, "train/loss")
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses
    assert column(rows, "val/loss")
    if stage == 3:  # (one stage is enough: the resume path is the same code for both)
        # Exact resume with two processes: every step's loss equals that of an uninterrupted run.
        run_script(args_for(tmp_path / "whole") + ["--trainer.max_steps", "12", "--export.enabled", "false"])
        resumed, whole = losses_by_step(rows), losses_by_step(read_metrics(tmp_path / "whole"))
        assert sorted(resumed) == sorted(whole) == list(range(12))
        for step in range(12):
            assert resumed[step] == pytest.approx(whole[step], abs=1e-5), step

    # The export reproduces the weights DeepSpeed trained: (a) the live engine's logits at the end
    # of training, checked in the run; (b) an independent consolidation of the final checkpoint.
    check = json.loads((root / "export_check.json").read_text())
    assert check["step"] == 12 and check["max_abs_diff"] < 1e-5
    model = AutoModelForCausalLM.from_pretrained(root / "hf")
    state = convert_zero_checkpoint_to_fp32_state_dict(str(root / "checkpoints" / "last.ckpt"), str(tmp_path / "c.pt"))
    reference = ZeroSForCausalLM(model.config)
    reference.load_state_dict({k[len("model.") :]: v for k, v in state["state_dict"].items()}, strict=False)
    reference.tie_weights()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(model, ids), logits_of(reference, ids), rtol=0, atol=1e-6)

    # The export command on a sharded checkpoint from the middle of the run.
    from zeros_lm import export

    mid = root / "checkpoints" / "step=0000008.ckpt"
    assert mid.is_dir()
    assert export.main([str(mid), str(tmp_path / "mid_hf")]) == 0
    mid_model = AutoModelForCausalLM.from_pretrained(tmp_path / "mid_hf")
    assert not torch.allclose(logits_of(mid_model, ids), logits_of(model, ids))  # step 8, not step 12


@pytest.mark.slow
def test_deepspeed_zero3_with_cpu_offload_trains(tmp_path, cache_dir):
    """ZeRO-3 with the optimizer states and the parameters offloaded to CPU memory (DeepSpeed's CPU
    Adam, compiled on first use): a few steps train and the export reproduces the trained model."""
    root = tmp_path / "offload"
    run_script(
        smoke_args(root, cache_dir, "--config", str(CONFIGS / "zero3_offload.yaml"), "--trainer.devices", "1",
                   "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
                   "--checkpoint.every_n_train_steps", "6"),
        timeout=900,
    )
    losses = losses_by_step(read_metrics(root))
    assert sorted(losses) == list(range(6))
    assert all(losses[i + 1] < losses[i] for i in range(5)), losses  # warm-up steps: the loss falls at each
    states = next((root / "checkpoints" / "last.ckpt").glob("**/*model_states.pt"))
    zero = torch.load(states, weights_only=False)["ds_config"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert json.loads((root / "export_check.json").read_text())["max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_a_stale_deepspeed_build_lock_is_one_clear_error(tmp_path, cache_dir, torch_extensions_dir):
    """A build of a DeepSpeed op killed midway leaves torch's lock file, for which every later run
    would wait forever: the run stops at once with one error naming the file, and nothing is trained."""
    lock = torch_extensions_dir / "cpu_adam" / "lock"
    lock.parent.mkdir(exist_ok=True)
    lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    try:
        proc = run_script(
            smoke_args(tmp_path / "run", cache_dir, "--trainer.devices", "1", "--trainer.strategy", "deepspeed_stage_2"),
            timeout=120,
            expect_rc=train.EXIT_ERROR,
        )
    finally:
        lock.unlink()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(lock) in errors[0] and "delete" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_build_locks_stale_recent_ignored_and_unrelated(tmp_path, capsys):
    from zeros_lm.rundir import RunError
    from zeros_lm.strategies import STALE_BUILD_LOCK_SECONDS, check_build_locks, deepspeed_build_locks

    def lock_at(relative: str, age: float) -> Path:
        path = tmp_path / relative / "lock"
        path.parent.mkdir(parents=True)
        path.touch()
        os.utime(path, (now - age, now - age))
        return path

    now = time.time()
    recent = lock_at("cpu_adam", 5)
    lock_at("my_own_extension", 10 * STALE_BUILD_LOCK_SECONDS)  # not DeepSpeed's: not ours to judge
    assert deepspeed_build_locks(tmp_path) == [recent]
    with process_holding(recent, "os.open(path, os.O_RDONLY)"):  # torch's builder holds it open
        check_build_locks(tmp_path, now=now)  # a build running now: a warning, not an error
        assert "another process is building DeepSpeed's cpu_adam op" in capsys.readouterr().err

        # torch's default layout has one more level (py<version>_<device>/<op>/lock)
        stale = lock_at("py311_cpu/fused_adam", STALE_BUILD_LOCK_SECONDS + 60)
        with pytest.raises(RunError, match="fused_adam op that started 11 min ago and was interrupted") as error:
            check_build_locks(tmp_path, now=now)
        assert str(stale) in str(error.value)
        check_build_locks(tmp_path, ignore=("fused_adam",), now=now)


@contextlib.contextmanager
def process_holding(path: Path, opens: str):
    """A live child process that has run ``opens`` (Python, with ``path`` set) and holds what it opened."""
    code = f"import os, sys, time; path = sys.argv[1]; handle = {opens}; print('holding', flush=True); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "holding"
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_build_lock_whose_process_is_gone_is_stale_whatever_its_age(tmp_path, capsys):
    """#25 item 12: a lock younger than ten minutes, left by a killed build, hung the next run."""
    from zeros_lm.rundir import RunError
    from zeros_lm.strategies import STALE_BUILD_LOCK_SECONDS, check_build_locks

    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    # torch's own lock, as its extension builder takes it
    with process_holding(lock, "__import__('torch.utils.file_baton').utils.file_baton.FileBaton(path).try_acquire()"):
        check_build_locks(tmp_path)
        assert "another process is building DeepSpeed's cpu_adam op" in capsys.readouterr().err
        a_long_build = time.time() - 2 * STALE_BUILD_LOCK_SECONDS
        os.utime(lock, (a_long_build, a_long_build))
        check_build_locks(tmp_path)  # a build that runs long is still running: never an error
        assert "another process is building DeepSpeed's cpu_adam op" in capsys.readouterr().err
    os.utime(lock)  # the build is killed seconds after it started
    with pytest.raises(RunError, match=r"cpu_adam op that started \d+ s ago and was interrupted") as error:
        check_build_locks(tmp_path)
    assert str(lock) in str(error.value) and "delete" in str(error.value)


def losses_by_step(rows: list[dict]) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.slow
def test_ddp_two_processes_train_and_export(tmp_path, cache_dir):
    root = tmp_path / "ddp"
    proc = run_script(
        smoke_args(root, cache_dir, "--config", str(CONFIGS / "ddp.yaml"), "--trainer.devices", "2",
                   "--trainer.max_steps", "10")
    )
    assert "Done: 10 steps" in proc.stdout
    losses = column(read_metrics(root), "train/loss")
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses
    assert json.loads((root / "export_check.json").read_text())["max_abs_diff"] < 1e-5
