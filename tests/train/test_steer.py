"""Training you can steer: eval split (deterministic, disjoint), eval loss and early stopping, datasets
mixed by weight, reward functions by import path (resolved up front, their source in the cache key)."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

from nexus_core import lineage
from nexus_core.artifacts import raw_ref, read_manifest
from nexus_core.cachekey import step_key
from nexus_core.errors import InputError
from nexus_core.train.grpo import GRPOConfig, run_grpo
from nexus_core.train.sft import SFTConfig
from nexus_core.train.steer import (
    callable_files,
    mix_counts,
    mix_records,
    resolve_callable,
    split_records,
    steer_problems,
)
from tests.train.conftest import _write_jsonl

ROWS = [{"input": f"question {i}", "output": f"answer {i}"} for i in range(40)]


# ---------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_order_free():
    train, held = split_records(ROWS, 0.25)
    assert len(held) == 10 and len(train) == 30
    assert not {str(r) for r in train} & {str(r) for r in held}
    again_train, again_held = split_records(list(reversed(ROWS)), 0.25)
    assert sorted(map(str, again_held)) == sorted(map(str, held))  # by content, not position
    assert split_records(ROWS, 0.0) == (ROWS, [])


def test_split_keeps_duplicates_on_one_side_and_refuses_to_hold_out_everything():
    rows = [{"text": "same"}] * 5 + [{"text": f"other {i}"} for i in range(5)]
    train, held = split_records(rows, 0.3)
    assert not ({"text": "same"} in train and {"text": "same"} in held)
    assert len(held) >= 1
    with pytest.raises(InputError, match="leaves no rows to train on"):
        split_records([{"text": "one"}] * 3, 0.5, "x.jsonl")


# ---------------------------------------------------------------- mix


def test_mix_counts_follow_weights_and_add_up():
    assert mix_counts([30, 10], [1, 1]) == [20, 20]
    assert mix_counts([8, 8], [3, 1]) == [12, 4]
    assert sum(mix_counts([7, 5, 3], [0.5, 0.3, 0.2])) == 15
    assert mix_counts([10, 10], [1, 0]) == [20, 0]


def test_mix_is_seeded_and_upsamples_small_sets():
    big, small = [{"d": "a", "i": i} for i in range(12)], [{"d": "b", "i": i} for i in range(3)]
    rows, counts = mix_records([big, small], [1, 1], seed=7)
    assert counts == [8, 7] and len(rows) == 15
    assert sum(r["d"] == "b" for r in rows) == 7  # every small row at least twice, then a sample
    assert all(sum(r == s for r in rows) >= 2 for s in small)
    assert len({r["i"] for r in rows if r["d"] == "a"}) == 8  # subsampled without repeats
    assert mix_records([big, small], [1, 1], seed=7)[0] == rows
    assert mix_records([big, small], [1, 1], seed=8)[0] != rows


def test_steer_problems_name_the_key():
    cfg = SFTConfig(data_weights=[1.0], early_stopping={"patience": 1}, eval_steps=3,
                    checkpoint={"save_steps": 4})
    ref = raw_ref(__file__)
    found = steer_problems(cfg, {"data": ref, "data_1": ref})
    assert any(p.startswith("data_weights: 1 weight(s) for 2 data input(s)") for p in found)
    assert any(p.startswith("early_stopping: needs eval data") for p in found)
    cfg = SFTConfig(eval_split=0.1, eval_steps=3, early_stopping={"patience": 1}, checkpoint={"save_steps": 4})
    assert any("must be a multiple of eval_steps (3)" in p for p in steer_problems(cfg, {"data": ref}))
    assert any("data_weights" in p for p in steer_problems(SFTConfig(), {"data": ref, "data_1": ref}))
    assert any("without gaps" in p for p in steer_problems(SFTConfig(data_weights=[1, 1]),
                                                           {"data": ref, "data_2": ref}))
    assert steer_problems(SFTConfig(eval_split=0.1, eval_steps=2, early_stopping={"patience": 1},
                                    checkpoint={"save_steps": 4}), {"data": ref}) == []


# ---------------------------------------------------------------- reward functions by import path


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A user package ``my_rewards_pkg.rewards`` on sys.path; returns its file."""
    pkg = tmp_path / "my_rewards_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    src = pkg / "rewards.py"
    src.write_text(textwrap.dedent("""
        def short(prompts, completions, **_):
            return [-float(len(str(c))) for c in completions]
        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield src
    for name in [m for m in sys.modules if m.startswith("my_rewards_pkg")]:
        del sys.modules[name]


def test_reward_paths_resolve_or_fail_naming_the_path(reward_module):
    fn = resolve_callable("my_rewards_pkg.rewards:short", "reward_funcs[0]")
    assert fn(["p"], ["abc"]) == [-3.0]
    for path, message in [
        ("my_rewards_pkg.nope:short", "reward_funcs[0]: 'my_rewards_pkg.nope:short': cannot import module"),
        ("my_rewards_pkg.rewards:long", "reward_funcs[0]: 'my_rewards_pkg.rewards:long': module "
                                        "'my_rewards_pkg.rewards' has no attribute 'long'"),
        ("my_rewards_pkg.rewards:NOT_A_FUNCTION", "is a int, not a function"),
        ("my_rewards_pkg.rewards.short", "not an import path of the form"),
    ]:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
            resolve_callable(path, "reward_funcs[0]")
    assert callable_files(["my_rewards_pkg.rewards:short"], "reward_funcs") == [reward_module,
                                                                                reward_module.parent / "__init__.py"]


def test_reward_function_source_joins_the_cache_key(reward_module, refs, tiny_model):
    cfg = GRPOConfig(rewards=[], reward_funcs=["my_rewards_pkg.rewards:short"])
    inputs = {"model": tiny_model, "data": refs["math"]}
    before = step_key(run_grpo, cfg, inputs)
    assert step_key(run_grpo, cfg, inputs) == before
    reward_module.write_text(reward_module.read_text().replace("-float(len(str(c)))", "-2.0 * len(str(c))"))
    assert step_key(run_grpo, cfg, inputs) != before  # an edited reward re-runs the stage
    with pytest.raises(InputError, match="reward_funcs\\[0\\]: 'my_rewards_pkg.rewards:gone'"):
        step_key(run_grpo, GRPOConfig(rewards=[], reward_funcs=["my_rewards_pkg.rewards:gone"]), inputs)


def test_a_reward_functions_helpers_in_its_package_join_the_cache_key(reward_module, refs, tiny_model):
    """The reward imports a helper module of its own package (relative import): editing the helper
    re-runs the stage; an installed library it imports does not count."""
    helpers = reward_module.parent / "helpers.py"
    helpers.write_text("def penalty(c):\n    return -float(len(str(c)))\n")
    reward_module.write_text(reward_module.read_text() + textwrap.dedent("""
        import math  # a library: not part of the key
        from .helpers import penalty

        def helped(prompts, completions, **_):
            return [penalty(c) for c in completions]
    """))
    files = callable_files(["my_rewards_pkg.rewards:helped"], "reward_funcs")
    assert helpers in files and not any("math" in f.name for f in files)
    cfg = GRPOConfig(rewards=[], reward_funcs=["my_rewards_pkg.rewards:helped"])
    inputs = {"model": tiny_model, "data": refs["math"]}
    before = step_key(run_grpo, cfg, inputs)
    helpers.write_text("def penalty(c):\n    return -2.0 * len(str(c))\n")
    assert step_key(run_grpo, cfg, inputs) != before


# ---------------------------------------------------------------- one stage that uses all of it


@pytest.mark.slow
def test_sft_mixes_datasets_evaluates_and_stops_early(tiny_model, refs, tmp_path):
    from nexus_core.runner import run_step
    from nexus_core.train.sft import run_sft

    chats = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                           {"role": "assistant", "content": " ".join(str(j) for j in range(i))}]}
             for i in range(1, 9)]
    extra = raw_ref(_write_jsonl(tmp_path / "counting.jsonl", chats))
    # threshold 100: no evaluation ever counts as an improvement, so patience 1 stops at the second one
    cfg = SFTConfig(finetune="lora", max_steps=8, batch_size=4, learning_rate=1e-3, seed=1, data_weights=[3, 1],
                    eval_split=0.25, eval_steps=1, checkpoint={"save_steps": 1},
                    early_stopping={"patience": 1, "threshold": 100.0})
    r = run_step(run_sft, cfg, name="t_sft_steer", inputs={"model": tiny_model, "data": refs["sft"], "data_1": extra})
    m = r.metrics
    assert r.stopped_early and r.steps == 2 and m["evaluations"] == 2
    assert m["eval_rows"] == 4 and m["train_rows"] == 12  # 2 of 8 held out of each dataset
    assert (m["mix_rows_data"], m["mix_rows_data_1"]) == (9, 3)  # 3:1 of the 12 training rows
    assert r.eval_loss is not None and math.isfinite(r.eval_loss)
    assert r.eval_loss == pytest.approx(m["best_eval_loss"], rel=1e-4)  # the best checkpoint was restored
    manifest = read_manifest(r.ref.uri)
    assert manifest.inputs["data"].digest == refs["sft"].digest and manifest.inputs["data_1"].digest == extra.digest
    run_id = manifest.mlflow_run_id
    assert [x.step for x in lineage.client().get_metric_history(run_id, "train/eval_loss")] == [1, 2]
    assert lineage.client().get_run(run_id).data.metrics["eval_loss"] == pytest.approx(r.eval_loss)


# ---------------------------------------------------------------- streaming SFT


def test_streamed_split_is_by_row_hash():
    from nexus_core.train.stream import held_out

    rows = [{"input": f"q{i}", "output": f"a{i}"} for i in range(2000)]
    held = [r for r in rows if held_out(r, 0.1)]
    assert 150 < len(held) < 250 and held == [r for r in rows if held_out(dict(r), 0.1)]
    assert not any(held_out(r, 0.0) for r in rows)


def test_streamed_sft_needs_max_steps(tiny_model, refs):
    from nexus_core.errors import StepError
    from nexus_core.runner import run_step
    from nexus_core.train.sft import run_sft

    with pytest.raises(StepError, match="max_steps: streamed data"):
        run_step(run_sft, SFTConfig(stream_threshold_mb=0, max_steps=-1), name="t_sft_stream_bad",
                 inputs={"model": tiny_model, "data": refs["sft"]})


@pytest.mark.slow
def test_sft_streams_two_mixed_datasets_with_an_eval_split(tiny_model, refs, tmp_path):
    from nexus_core.runner import run_step
    from nexus_core.train.sft import SFTConfig as Cfg
    from nexus_core.train.sft import _records, run_sft
    from nexus_core.train.stream import held_out

    chats = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                           {"role": "assistant", "content": " ".join(str(j) for j in range(i))}]}
             for i in range(1, 17)]
    extra = raw_ref(_write_jsonl(tmp_path / "counting.jsonl", chats))
    cfg = Cfg(finetune="lora", max_steps=3, batch_size=4, learning_rate=1e-3, stream_threshold_mb=0,
              data_weights=[1, 1], eval_split=0.3, checkpoint={"save_steps": 3})
    r = run_step(run_sft, cfg, name="t_sft_stream", inputs={"model": tiny_model, "data": refs["sft"], "data_1": extra})
    assert r.streamed and r.steps == 3 and math.isfinite(r.metrics["train_loss"]) and r.metrics["param_delta"] > 0
    expected = sum(held_out(x, 0.3) for ref in (refs["sft"], extra) for x in _records(cfg, ref))
    assert expected > 0 and r.metrics["eval_rows"] == expected  # the same rows the hash picks, read once
    assert r.eval_loss is not None and math.isfinite(r.eval_loss)


# ---------------------------------------------------------------- GRPO generation through vLLM


@pytest.fixture()
def health_server():
    """A loopback HTTP server: /health/ answers 200 (as `trl vllm-serve` does), anything else 404."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's API
            self.send_response(200 if self.path == "/health/" else 404)
            self.end_headers()

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_vllm_generation_is_checked_up_front(health_server, monkeypatch):
    import importlib.util

    from nexus_core.train import common
    from nexus_core.train.grpo import _vllm_kwargs, vllm_problems

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real_find_spec(n, *a))
    monkeypatch.setattr(common, "cuda_available", lambda: False)
    problems = vllm_problems(GRPOConfig(use_vllm=True))  # colocate: no server to ask
    assert len(problems) == 2 and "vllm package is not installed" in problems[0] and "CUDA GPU" in problems[1]

    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "vllm" else real_find_spec(n, *a))
    monkeypatch.setattr(common, "cuda_available", lambda: True)
    assert vllm_problems(GRPOConfig(use_vllm=True, vllm_mode="server", vllm_server_url=health_server + "/")) == []
    wrong = vllm_problems(GRPOConfig(use_vllm=True, vllm_mode="server", vllm_server_url=health_server + "/v1"))
    assert wrong == [f"use_vllm: vllm_server_url {health_server}/v1 answered 404 to GET /health/; is it a "
                     "`trl vllm-serve` server?"]
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    (gone,) = vllm_problems(GRPOConfig(use_vllm=True, vllm_mode="server", vllm_server_url=dead))
    assert gone.startswith(f"use_vllm: vllm_server_url {dead} is not reachable") and "trl vllm-serve" in gone

    # what reaches trl's GRPOConfig (which accepts these fields)
    from trl import GRPOConfig as TrlGRPOConfig

    server = _vllm_kwargs(GRPOConfig(use_vllm=True, vllm_mode="server", vllm_server_url=health_server + "/"))
    assert server == {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": health_server}
    colocate = _vllm_kwargs(GRPOConfig(use_vllm=True, vllm_gpu_memory_utilization=0.5))
    assert colocate == {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.5}
    assert _vllm_kwargs(GRPOConfig()) == {}
    for kw in (server, colocate):
        assert TrlGRPOConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, **kw).use_vllm


def test_grpo_with_vllm_stops_before_training_on_this_machine(tiny_model, refs, tmp_path):
    """No vllm package here (and no GPU): the stage refuses before any launch, naming the problem."""
    from nexus_core.context import StepContext
    from nexus_core.errors import StepError

    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    ctx = StepContext.detached()
    with pytest.raises(StepError, match="cannot start training:\n  - use_vllm: the vllm package is not installed"):
        run_grpo(GRPOConfig(use_vllm=True, max_steps=1), inputs={"model": tiny_model, "data": refs["math"]},
                 out_uri=str(tmp_path / "o"), ctx=ctx)
    assert not any(ctx.work_dir.iterdir())  # no checkpoints, no launch spec


def test_vllm_server_url_is_runtime_and_vllm_use_resume_neutral(refs, tiny_model):
    from nexus_core.cachekey import resume_key

    inputs = {"model": tiny_model, "data": refs["math"]}
    base = GRPOConfig(use_vllm=True, vllm_mode="server")
    moved = GRPOConfig(use_vllm=True, vllm_mode="server", vllm_server_url="http://10.0.0.2:8000")
    assert step_key(run_grpo, moved, inputs) == step_key(run_grpo, base, inputs)  # where the server runs
    off = GRPOConfig()
    assert step_key(run_grpo, off, inputs) != step_key(run_grpo, base, inputs)  # sampling differs
    assert resume_key(run_grpo, off, inputs) == resume_key(run_grpo, base, inputs)  # checkpoints still apply
