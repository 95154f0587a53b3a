"""Plumbing of ``scripts/bench.py grpo``: how worker runs become the results section and the table.

The workers themselves take minutes (engine start-up, three sides); this checks the arithmetic and the
failure notes on made-up runs, in a second.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import types

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts scripts/ on sys.path, so the ``benchmarks`` package imports
    import benchmarks.common
    import benchmarks.grpo
    import benchmarks.lora_sync
    import benchmarks.plots
    import benchmarks.scale
    import benchmarks.tp_sync

    found = {}
    for part in (benchmarks.common, benchmarks.plots, benchmarks.grpo, benchmarks.lora_sync, benchmarks.scale,
                 benchmarks.tp_sync, module):
        found.update(vars(part))
    return types.SimpleNamespace(**found)  # the CLI and what each benchmark module defines, as one namespace


def ours_run(samples_per_s: float) -> dict:
    return {"samples_per_s": samples_per_s, "completion_tokens": 32.0, "rollout_s": 2.0, "bare_vllm_s": 1.9,
            "rollout_tokens": 2000, "bare_vllm_tokens": 2000, "step_s": 3.48, "pure_train_s": 1.0,
            "bare_vllm_plain_s": 1.8, "shares": {"generate": 0.5, "reward": 0.05, "train": 0.43, "sync": 0.02}}


def args(**extra) -> argparse.Namespace:
    values = {"prompts": 8, "n": 8, "max_tokens": 32, "steps": 4, "repeats": 3, "hidden": 256, "layers": 4,
              "eager": False, "threads": 2, "warm_start": True, "padding_free": True}
    return argparse.Namespace(**{**values, **extra})


def test_grpo_result_takes_medians_and_compares_with_the_best_trl(bench, capsys):
    samples = {"ours": [ours_run(10.0), ours_run(12.0), ours_run(30.0)],
               "trl": [{"samples_per_s": 4.0, "completion_tokens": 31.0}] * 3,
               "trl_vllm": [{"samples_per_s": 5.0, "completion_tokens": 31.5}, {"samples_per_s": 6.0,
                                                                                "completion_tokens": 31.5}]}
    result = bench.grpo_result(args(), samples, params=1000)
    assert result["samples_per_s"] == 12.0 and result["trl_samples_per_s"] == 4.0
    assert result["trl_vllm_samples_per_s"] == 5.5
    assert result["ratio_vs_best_trl"] == pytest.approx(12.0 / 5.5, abs=1e-3)
    assert result["rollout_vs_vllm"] == pytest.approx(0.95) and result["sync_share"] == 0.02
    assert result["rollout_same_tokens"] and result["step_vs_bound"] == pytest.approx(1.2)
    assert "notes" not in result and result["samples"]["ours"] == [10.0, 12.0, 30.0]
    bench.print_grpo(result)
    table = capsys.readouterr().out
    assert "TRL (vLLM colocate)" in table and "2.18" in table


def test_a_trl_side_that_cannot_run_is_a_note_not_a_number(bench, capsys):
    failure = "RuntimeError: worker grpo failed:\n  ...\nValueError: vLLM colocate needs a GPU"
    samples = {"ours": [ours_run(10.0)], "trl": [{"samples_per_s": 4.0, "completion_tokens": 31.0}],
               "trl_vllm": [{"error": bench._last_error_line(failure)}]}
    result = bench.grpo_result(args(), samples, params=1000)
    assert "trl_vllm_samples_per_s" not in result
    assert result["notes"]["trl_vllm_samples_per_s"] == "ValueError: vLLM colocate needs a GPU"
    assert result["ratio_vs_best_trl"] == 2.5 and result["samples"]["trl_vllm"] == [None]
    bench.print_grpo(result)
    assert "n/a" in capsys.readouterr().out


@pytest.mark.parametrize("command, options", [
    ("grpo", ("--threads", "--repeats", "--no-trl-vllm", "--eager", "--no-warm-start", "--no-padding-free")),
    ("scale", ("--steps", "--repeats", "--sizes", "--bucket-mb", "--threads", "--plot")),
    ("tp-sync", ("--sizes", "--bucket-mb", "--rounds", "--repeats", "--plot")),
])
def test_subcommand_is_registered(bench, capsys, command, options):
    assert command in bench.COMMANDS
    with pytest.raises(SystemExit) as done:
        bench.main([command, "--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    for option in options:
        assert option in usage


def lora_run(mode: str, sync_s: list[float], nbytes: int, tokens_per_s: float) -> dict:
    return {"mode": mode, "start_s": 4.0, "first_sync_s": 0.2, "first_sync_bytes": 3_000_000 + nbytes,
            "base_bytes": 3_000_000 if mode == "adapter" else 0, "sync_s": sync_s, "gather_s": [0.001] * len(sync_s),
            "bytes": nbytes, "tensors": 28, "measured_peak_mib": 0.5, "greedy_match": True,
            "generate_s": 1.0, "generate_tokens_per_s": tokens_per_s, "params": 787_072, "adapter_params": 94_208}


def test_lora_sync_result_compares_the_modes_per_size(bench, capsys):
    runs = {"tiny": {"adapter": [lora_run("adapter", [0.004, 0.006], 376_832, 140.0),
                                 lora_run("adapter", [0.005, 0.100], 376_832, 150.0)],
                     "merged": [lora_run("merged", [0.09, 0.08], 3_148_288, 200.0),
                                lora_run("merged", [0.10, 0.11], 3_148_288, 190.0)]}}
    result = bench.lora_sync_result(args(rank=16, syncs=2, repeats=2), runs)
    tiny = result["sizes"]["tiny"]
    assert tiny["adapter"]["sync_ms"] == pytest.approx(5.5) and tiny["merged"]["sync_ms"] == pytest.approx(95.0)
    assert tiny["sync_speedup"] == pytest.approx(95.0 / 5.5, abs=0.01)
    assert tiny["bytes_ratio"] == pytest.approx(8.4) and tiny["generate_ratio"] == pytest.approx(145 / 195, abs=1e-3)
    assert tiny["adapter"]["greedy_match"] and result["settings"]["rank"] == 16
    bench.print_lora_sync(result)
    table = capsys.readouterr().out
    assert "adapter sync 17.3x faster, 8x fewer bytes" in table and "0.74x" in table

def scale_run(step_s: float, wait: float = 0.0, staleness: float = 0.0) -> dict:
    return {"step_s": step_s, "samples_per_s": 64 / step_s, "generate": 1.0, "train": 1.0, "sync": 0.05,
            "generate_wait": wait, "staleness": staleness}


def scale_args(**extra) -> argparse.Namespace:
    values = {"prompts": 8, "n": 8, "max_tokens": 32, "steps": 3, "repeats": 3, "hidden": 256, "layers": 4,
              "micro_batch": 16, "bucket_mb": 32, "threads": 0}
    return argparse.Namespace(**{**values, **extra})


def test_scale_result_takes_medians_and_speedups_over_one_process_and_plots(bench, tmp_path, capsys):
    runs = {"1 process": [scale_run(4.0), scale_run(3.0), scale_run(9.0)],
            "2 colocated": [scale_run(2.5)] * 3,
            "2 disaggregated async": [scale_run(2.0, wait=0.5, staleness=1.0), scale_run(6.0, 0.1, 1.0)]}
    sync = [{"parameters": 10**6, "model_bytes": 4 * 10**6, "seconds": 0.01, "peak_bucket_bytes": 4 * 10**6,
             "num_buckets": 1, "measured_peak_bytes": 5 * 10**6, "memory_source": "rss_high_water"},
            {"parameters": 10**8, "model_bytes": 4 * 10**8, "seconds": 0.9, "peak_bucket_bytes": 3 * 10**7,
             "num_buckets": 14, "measured_peak_bytes": None, "memory_source": None}]
    result = bench.scale_result(scale_args(), runs, sync, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    setups = result["setups"]
    assert list(setups) == ["1 process", "2 colocated", "2 disaggregated async"]  # a setup without runs is left out
    assert setups["1 process"]["step_s"] == 4.0 and setups["1 process"]["speedup"] == 1.0
    assert setups["2 colocated"]["speedup"] == pytest.approx(1.6)
    async_run = setups["2 disaggregated async"]
    assert async_run["step_s"] == 4.0 and async_run["generate_wait"] == pytest.approx(0.3)
    assert async_run["staleness"] == 1.0 and async_run["schedule"] == "one_step_async"
    assert result["load_average"] == {"start": [1.0, 2.0, 3.0], "end": [4.0, 5.0, 6.0]}
    assert result["sync"] == sync
    plot = tmp_path / "scale.png"
    bench.plot_scale(result, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bench.print_scale(result)
    table = capsys.readouterr().out
    assert "1.60x" in table and "n/a" in table and "100,000,000" in table


def test_gpu_check_runs_its_measurements_on_cpu(tmp_path):
    """scripts/gpu_check.sh is meant for one call on a lent GPU; its CPU smoke size runs the same code."""
    import json
    import os
    import subprocess

    from tests.conftest import REPO

    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(REPO))
    result = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--size", "tiny", "--device", "cpu",
                             "--length", "48", "--steps", "2", "--bucket-mb", "1"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((tmp_path / "gpu_check.json").read_text())
    assert found["dtype"] == "torch.bfloat16" and found["parameters"] > 0
    assert found["learner"]["tokens_per_s"] > 0 and found["learner"]["last_loss"] == found["learner"]["last_loss"]
    sync = found["sync"]
    assert sum(sync["shard_bytes"]) > 0 and all(r["bytes"] == sync["rounds"][0]["bytes"] for r in sync["rounds"])
    assert sync["rounds"][0]["buckets"] > 1  # 1 MiB buckets over a ~2 MiB bf16 model


def test_tp_sync_sizes_can_be_split_over_two_shards(bench):
    # vLLM refuses TP=2 when the head count (hidden / 64 in make_tiny_model) is odd.
    for hidden, _layers in bench.TP_SYNC_SIZES:
        assert hidden % 64 == 0 and (hidden // 64) % 2 == 0, hidden


def test_layout_diagram_is_drawn_from_the_layout_class(tmp_path):
    out = tmp_path / "layout.png"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "draw_layout.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
