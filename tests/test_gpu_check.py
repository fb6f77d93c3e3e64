"""CPU dry run of the prepared GPU check (.ci/gpu_check.sh, bench/gpu.py): argument parsing,
the paper preset's token arithmetic, the stand-in VAE tokenizer, and the report of each step at
tiny sizes on the CPU, so that a mistake shows up here rather than in a scarce device run."""
import importlib.util
import json
import os
import pathlib
import subprocess

import pytest
import torch

import dit4dit
import kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gb = _load_gpu_bench()


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "gpu_check.sh")], check=True)


def test_causal_latent_frames():
    assert [gb.causal_latent_frames(n, 4) for n in (1, 2, 5, 6, 9)] == [1, 2, 2, 3, 3]
    assert gb.causal_latent_frames(3, 1) == 3


def test_paper_shapes():
    """image 256 px / 8 = 32 latent, / patch 2 = 16 x 16 = 256 tokens per latent frame;
    1 + 8 frames / causal 4x = 3 latent frames; N = 768 video tokens."""
    s = gb.preset_shapes("paper")
    assert (s["latent"], s["tokens_per_frame"], s["latent_frames"], s["video_tokens"]) == (32, 256, 3, 768)
    assert (s["video_heads"], s["video_head_dim"], s["video_width"]) == (16, 128, 2048)
    assert (s["action_tokens"], s["action_heads"], s["action_head_dim"], s["action_width"]) == (17, 12, 64, 768)
    assert s["text_tokens"] == gb.PAPER_TEXT_TOKENS
    assert any("1 + ceil(8/4)) = 3 latent frames" in line for line in s["lines"])
    cases = {name: (op, shape) for name, op, shape in gb.op_cases(s, batch=8)}
    assert cases["video self-attn"] == ("attention", (8, 16, 768, 768, 128))
    assert cases["video cross-attn (text)"] == ("attention", (8, 16, 768, 512, 128))
    assert cases["action cross-attn (h)"] == ("attention", (32, 12, 17, 768, 64))  # B * R, R = 4
    assert cases["video adaLN (per frame)"] == ("adaln", (8, 768, 2048, 3))
    assert dict((n, sh) for n, _, sh in gb.op_cases(s, batch=1))["action adaLN"] == (1, 17, 768, 1)


def test_toy_shapes():
    s = gb.preset_shapes("toy")
    assert (s["tokens_per_frame"], s["latent_frames"], s["video_tokens"], s["video_head_dim"]) == (16, 3, 48, 24)
    # the action DiT reads the conditioning frame's 16 tokens and the 48 instruction tokens
    assert (s["action_tokens"], s["action_head_dim"], s["text_tokens"], s["action_context"]) == (9, 32, 48, 64)


def test_work_counts():
    assert gb.attention_flops((1, 16, 768, 768, 128)) == 4 * 16 * 768 * 768 * 128
    assert gb.attention_flops((1, 1, 2, 3, 4), backward=True) == 2.5 * 4 * 24
    assert gb.adaln_bytes((2, 768, 2048, 3), torch.bfloat16) == 2 * 2 * 768 * 2048 * 2
    assert gb.adaln_bytes((1, 10, 8, 1), torch.float32, backward=True) == 3 * 80 * 4


def test_parse_args():
    args = gb.parse_args(["ops", "--cpu-smoke", "--reps", "3"])
    assert args.cpu_smoke and args.reps == 3 and args.presets == ["toy", "paper"] and args.train_batch["toy"] == 32
    assert gb.parse_args(["predict"]).presets == ["paper"]
    assert gb.parse_args(["train", "--data", "d"]).steps == 100
    assert gb.parse_args(["paper-train"]).max_batch is None and gb.parse_args(["paper-train"]).budget_s == 60
    for bad in (["ops", "--reps", "0"], ["train"], ["nope"], ["predict", "--presets", "huge"], [],
                ["paper-train", "--max-batch", "0"], ["paper-train", "--budget-s", "0"]):
        with pytest.raises(SystemExit):
            gb.parse_args(bad)


def test_stand_in_tokenizer_has_the_vae_shapes():
    tok = gb.LatentStandIn()
    video = torch.rand(2, 3, 9, 64, 48) * 2 - 1
    assert tok.latent_frames(9) == 3
    z = tok.encode(video)
    assert z.shape == (2, 16, 3, 8, 6)
    assert tok.encode(video[:, :, :1]).shape == (2, 16, 1, 8, 6)
    assert torch.equal(tok.encode(video)[:, :, :1], tok.encode(video[:, :, :1]))  # causal: frame 0 alone
    assert tok.decode(z).shape == (2, 3, 3, 64, 48)
    model = dit4dit.DiT4DiT(gb.small_paper_config(), tokenizer=tok)  # the interface DiT4DiT checks
    assert model.tokenizer is tok


def test_paper_model_is_built_on_the_device():
    """Every parameter and buffer (the stand-in tokenizer's too) lands on the target device: the
    meta device stands in for CUDA, at the paper's full size, without allocating."""
    meta = torch.device("meta")
    model = gb.build_model("paper", meta, torch.bfloat16, cpu_smoke=False, randomize=False)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert "tokenizer.proj" in tensors
    assert {name for name, t in tensors.items() if t.device != meta or t.dtype != torch.bfloat16} == set()
    assert 2.2e9 < sum(p.numel() for p in model.parameters()) < 2.25e9  # the release: 2 222.5 M
    assert not model.training


def test_read_step_seconds(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [dict(step=1, seconds=0.5, loss=2.0), dict(step=50, seconds=5.4, loss=1.0),
            dict(step=100, seconds=10.4, loss=0.5, action_loss=0.3, video_loss=0.2)]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    per_step, last = gb.read_step_seconds(log)
    assert per_step == pytest.approx(0.1) and last["loss"] == 0.5
    log.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="two log rows"):
        gb.read_step_seconds(log)


def test_summary_lines():
    rows = {"ops": {"rows": [dict(preset="paper", name="paper video self-attn, inference batch", dtype="bfloat16",
                                  direction="fwd", shape=[1, 16, 768, 768, 128], ms={"dit4dit kernel": 2.0, "SDPA flash": 0.5, "SDPA efficient": 1.0,
                                                       "PyTorch reference (fp32 compute)": 0.1})]},
            "predict": {"rows": [dict(preset="paper", backend="1", dtype="bfloat16", fast_ms=20.0, naive_ms=30.0,
                                      fast_hz=50.0, naive_hz=33.3, agree=True)]},
            "train": {"rows": [dict(name="DiT4DiT", ok=True, s_per_step=0.05, steps=100),
                               dict(name="action-only", ok=False, rc=1)]}}
    lines = gb.summarize(rows)
    assert len(lines) == 4
    assert "video self-attn" in lines[0] and "1x16x768x768x128" in lines[0]
    assert "flash" in lines[0] and "0.25x" in lines[0]  # the best built-in; the fp32 reference is no baseline
    assert "50.0 Hz" in lines[1] and "33.3 Hz" in lines[1]
    assert "50.0 ms/step" in lines[2] and "FAILED" in lines[3]


def test_attention_paths_from_kernel_names():
    """The profiled kernel names say which attention kernels ran; the preprocess and cast kernels
    of the backward name neither."""
    shared = ["void dit4dit_cuda::attention_bwd_preprocess_kernel<__nv_bfloat16, 4>(...)",
              "void dit4dit_cuda::attention_cast_kernel<__nv_bfloat16>(...)"]
    tc = ["void dit4dit_cuda::attention_fwd_tc_kernel<__nv_bfloat16, 128>(...)",
          "void dit4dit_cuda::attention_bwd_tc_kernel<__nv_bfloat16, 128>(...)"]
    simt = ["void dit4dit_cuda::attention_fwd_kernel<float, 64, 64, 32, 128>(...)",
            "void dit4dit_cuda::attention_bwd_kernel<float, 64, 32, 32, 128>(...)"]
    assert gb.attention_paths_from_names(shared + tc) == dict(fwd="tensor cores (attention_fwd_tc_kernel)",
                                                              bwd="tensor cores (attention_bwd_tc_kernel)")
    assert gb.attention_paths_from_names(shared + simt) == dict(fwd="SIMT (attention_fwd_kernel)",
                                                                bwd="SIMT (attention_bwd_kernel)")
    assert gb.attention_paths_from_names(shared)["bwd"].startswith("unknown")


needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels._C not built: {kernels.load_error()}")


@needs_kernels
def test_ops_report_on_cpu(capsys):
    cpu = torch.device("cpu")
    dit4dit.select_backend("0")
    try:
        fwd = gb.bench_one("tiny attention", "attention", (1, 2, 9, 5, 8), torch.float32, cpu, reps=2, backward=False)
        bwd = gb.bench_one("tiny adaLN", "adaln", (2, 6, 16, 3), torch.float32, cpu, reps=2, backward=True)
    finally:
        dit4dit.select_backend(os.environ.get("DIT4DIT_KERNELS", "auto"))
    out = capsys.readouterr().out
    assert "attention fwd  tiny attention  (1, 2, 9, 5, 8)  float32" in out and "row/kernel" in out
    assert set(fwd["ms"]) == {"dit4dit kernel", "SDPA (default)", "PyTorch reference (fp32 compute)"}
    assert fwd["unit"] == "TFLOP/s" and bwd["unit"] == "GB/s" and bwd["direction"] == "bwd"
    assert all(err < 1e-5 for err in fwd["errors"].values()) and bwd["errors"]["dit4dit kernel"] < 1e-5


def test_predict_on_cpu_and_its_mismatch_check(tmp_path, capsys, monkeypatch):
    results = tmp_path / "r.jsonl"
    rows = gb.cmd_predict(gb.parse_args(["predict", "--cpu-smoke", "--presets", "toy", "--repeats", "1",
                                         "--json", str(results)]))
    assert rows and all(r["agree"] and r["max_diff"] <= 2e-2 and r["fast_ms"] > 0 for r in rows)
    assert "early exit + cached K/V (predict_action)" in capsys.readouterr().out
    assert json.loads(results.read_text().splitlines()[-1])["step"] == "predict"

    def wrong(model, obs, state, instruction, generator):
        return torch.ones(obs.shape[0], model.config.action_horizon, model.config.action_dim)

    monkeypatch.setattr(gb, "release_path", lambda: wrong)
    with pytest.raises(SystemExit, match="disagree"):
        gb.cmd_predict(gb.parse_args(["predict", "--cpu-smoke", "--presets", "toy", "--repeats", "1"]))


@needs_kernels
def test_ops_step_fails_when_the_kernel_fails(monkeypatch, capsys):
    def broken(q, k, v):
        raise RuntimeError("attention_fwd: planted failure")

    monkeypatch.setattr(kernels, "attention", broken)
    try:
        with pytest.raises(SystemExit, match="planted failure"):
            gb.cmd_ops(gb.parse_args(["ops", "--cpu-smoke", "--reps", "1", "--presets", "toy"]))
    finally:
        dit4dit.select_backend(os.environ.get("DIT4DIT_KERNELS", "auto"))
    assert "dit4dit kernel" in capsys.readouterr().out



def test_paper_train_on_cpu_finds_the_largest_batch(tmp_path, capsys, monkeypatch):
    """The paper preset's training step (small stand-in): batch 1, 2 timed; with out-of-memory
    planted from batch 4 on, the sweep stops there and records 2 as the largest batch that fit;
    a budget too small for batch 2 stops it after batch 1; out of memory at batch 1 fails the step,
    and so does any other error."""
    results = tmp_path / "r.jsonl"
    plain = gb.cmd_paper_train(gb.parse_args(["paper-train", "--cpu-smoke", "--json", str(results)]))
    assert [r["batch"] for r in plain["rows"]] == [1, 2]
    assert all(r["ms"] > 0 and r["samples_s"] > 0 and r["loss"] > 0 for r in plain["rows"])
    assert (plain["largest_fit"], plain["oom_at"], plain["activation_checkpointing"]) == (2, None, False)
    assert json.loads(results.read_text().splitlines()[-1])["step"] == "paper-train"
    assert "largest batch that fit: 2" in capsys.readouterr().out

    loss = dit4dit.DiT4DiT.loss

    def plant(error, from_batch):
        def planted(model, batch, generator=None):
            if batch["video"].shape[0] >= from_batch:
                raise error
            return loss(model, batch, generator)
        monkeypatch.setattr(dit4dit.DiT4DiT, "loss", planted)

    plant(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (planted)"), 4)
    oom = gb.cmd_paper_train(gb.parse_args(["paper-train", "--cpu-smoke", "--max-batch", "16", "--json",
                                            str(results)]))
    assert [r["batch"] for r in oom["rows"]] == [1, 2]
    assert (oom["largest_fit"], oom["oom_at"], oom["stopped"]) == (2, 4, "out of memory at batch 4")
    assert "4 out of memory (CUDA out of memory. Tried to allocate 20.00 GiB (planted))" in capsys.readouterr().out
    lines = gb.summarize({"paper-train": json.loads(results.read_text().splitlines()[-1])})
    assert len(lines) == 3 and "batch 2," in lines[1] and "largest batch that fit 2" in lines[2]
    assert "out of memory at batch 4" in lines[2]

    short = gb.cmd_paper_train(gb.parse_args(["paper-train", "--cpu-smoke", "--max-batch", "16", "--budget-s", "1e-3"]))
    assert [r["batch"] for r in short["rows"]] == [1] and short["stopped"].startswith("time budget")

    plant(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), 1)
    with pytest.raises(SystemExit, match="not even batch 1"):
        gb.cmd_paper_train(gb.parse_args(["paper-train", "--cpu-smoke"]))
    plant(RuntimeError("mat1 and mat2 shapes cannot be multiplied (planted)"), 2)  # a bug, not memory: it fails
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        gb.cmd_paper_train(gb.parse_args(["paper-train", "--cpu-smoke"]))
