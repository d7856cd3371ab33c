"""Distill steps called directly through the spine (no Prefect): bad input, resume, filters, packaging."""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest

from nexus_core.artifacts import raw_ref
from nexus_core.cachekey import step_key
from nexus_core.config import load_config
from nexus_core.distill.collect import CollectConfig, run_teacher_collect
from nexus_core.distill.inputs import TeacherInputsConfig, run_teacher_inputs
from nexus_core.distill.prompts import TeacherConfig
from nexus_core.distill.regenerate import RegenerateConfig, run_regenerate
from nexus_core.distill.rules import apply_rules, load_rules
from nexus_core.errors import ConfigError, InputError
from nexus_core.runner import run_step
from tests.support import distill_teacher
from tests.support.openai_stub import Reply, StubServer

ABSTRACTS = "data/raw/scientific/abstracts.jsonl"
ENHANCED = "data/raw/scientific/enhanced_prompts.json"


def _inputs(*paths, **kw):
    sources = {f"s{i}": raw_ref(p) for i, p in enumerate(paths)}
    return run_step(run_teacher_inputs, TeacherInputsConfig(**kw), name="ti", inputs=sources)


def test_teacher_inputs_from_jsonl_and_enhanced_json(data_root):
    res = _inputs(ABSTRACTS, ENHANCED)
    df = pl.read_parquet(res.ref.path / "data.parquet")
    assert res.rows == (16 + 4) * 2
    for col in ("domain", "template_name", "user_prompt", "template_prompt", "system_prompt", "source_file",
                "generated_at", "template_hash", "row_id"):
        assert col in df.columns
    enhanced = df.filter(pl.col("source_file") == "enhanced_prompts.json")
    assert set(enhanced["generated_at"]) == {"2025-01-15T10:00:00Z"}
    assert "climate" in set(enhanced["domain"]) and "materials" in set(enhanced["domain"])
    assert df["row_id"].n_unique() == df.height


@pytest.mark.parametrize("content,match", [
    (b'{"title": "t", "abstract": "a", "domain": "d", "text": "long enough text here"}\n{oops\n',
     r"bad\.jsonl:2: not valid JSON"),
    (b'{"title": "t", "abstract": "a", "domain": "d", "text": "caf\xe9 au lait, long text"}\n',
     r"bad\.jsonl:1: not valid UTF-8"),
    (b'{"title": "t", "domain": "d", "text": "long enough text here"}\n', r"record 1: missing field\(s\) abstract"),
    (b"\n", r"bad\.jsonl: no records"),
])
def test_bad_sources_are_named(tmp_path, data_root, content, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(InputError, match=match):
        _inputs(bad)


def test_unknown_template_and_bad_enhanced_json(tmp_path, data_root):
    with pytest.raises(InputError, match=r"unknown prompt template 'nope'.*known: hypothesis, methodology, strict"):
        _inputs(ABSTRACTS, templates=["nope"])
    bad = tmp_path / "e.json"
    bad.write_text('{"texts": [\n  "ok",\n  oops]}')
    with pytest.raises(InputError, match=r"e\.json:3: not valid JSON"):
        _inputs(bad)


def test_collect_failed_rows_kept_then_rerun_asks_only_for_them(data_root):
    ti = _inputs(ABSTRACTS, templates=["hypothesis"])

    def flaky(body, n):  # every third prompt fails hard on the first run
        if distill_teacher._bucket(body["messages"][-1]["content"]) < 3:
            return Reply(status=500, body={"error": {"message": "down"}})
        return distill_teacher.handler(body, n)

    with StubServer(flaky) as stub:
        cfg = CollectConfig(teacher=TeacherConfig(model="openai/t", api_base=stub.url, max_retries=0), batch_size=5)
        first = run_step(run_teacher_collect, cfg, name="col", inputs={"teacher_inputs": ti.ref})
        asked_first = len(stub.requests)
    df1 = pl.read_parquet(first.ref.path / "data.parquet")
    assert first.failed > 0 and first.ok > 0 and df1.height == 16  # failures are rows, not dropped
    assert set(df1.filter(pl.col("status") == "failed")["error"].str.slice(0, 20)) == {"InternalServerError:"}
    with StubServer(distill_teacher.handler) as stub:
        cfg2 = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"api_base": stub.url})})
        second = run_step(run_teacher_collect, cfg2, name="col", inputs={"teacher_inputs": ti.ref})
        asked_second = len(stub.requests)
    df2 = pl.read_parquet(second.ref.path / "data.parquet")
    assert asked_first == 16 and asked_second == first.failed  # only missing/failed rows asked again
    assert second.ok == 16 and second.cached == first.ok
    assert df2["row_id"].n_unique() == 16 and df2["row_id"].sort().to_list() == df1["row_id"].sort().to_list()
    lp = df2.filter(pl.col("logprobs_json").is_not_null())
    assert lp.height == 0  # logprobs only when asked (top_logprobs=0 here)


def test_collect_offline_names_misses(data_root):
    ti = _inputs(ABSTRACTS, templates=["hypothesis"])
    cfg = CollectConfig(teacher=TeacherConfig(model="openai/never-recorded", offline=True, cache=False))
    res = run_step(run_teacher_collect, cfg, name="off", inputs={"teacher_inputs": ti.ref})
    assert res.failed == 16 and len(res.offline_misses) == 16
    df = pl.read_parquet(res.ref.path / "data.parquet")
    assert df["error"].str.starts_with("offline: no cached response").all()


def test_filter_rules_flag_each_weakness(repo):
    rules, _ = load_rules(repo / "configs/distill/filters.yaml")
    good_h = distill_teacher.good_answer("hypothesis", "Soil respiration")
    good_m = distill_teacher.good_answer("methodology", "Soil respiration")
    rows = [("hypothesis", good_h), ("methodology", good_m), ("hypothesis", good_h + " "),
            ("hypothesis", distill_teacher.weak_answer("short", "hypothesis", "x")),
            ("hypothesis", distill_teacher.weak_answer("citation", "hypothesis", "x")),
            ("hypothesis", distill_teacher.weak_answer("vague", "hypothesis", "x")),
            ("methodology", distill_teacher.weak_answer("chatty", "methodology", "x")),
            ("hypothesis", None)]
    df = pl.DataFrame({"template_name": [r[0] for r in rows], "response": [r[1] for r in rows]})
    out = apply_rules(df, rules)
    reasons = out["reasons"].to_list()
    assert out["keep"].to_list()[:2] == [True, True]
    assert reasons[2] == ["exact_duplicate"]
    assert "too_short" in reasons[3]
    assert "citation" in reasons[4]
    assert "not_falsifiable" in reasons[5]
    assert "broken_format" in reasons[6] and "no_methodology" in reasons[6]
    assert reasons[7] == ["no_response"]


def test_bad_rules_file_names_key(tmp_path, repo):
    text = (repo / "configs/distill/filters.yaml").read_text().replace("'(?i)\\bpredicts?\\b'", "'(?<=x)y'")
    bad = tmp_path / "filters.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=r"falsifiable_patterns\[2\]: bad regex"):
        load_rules(bad)


def test_every_distill_yaml_validates(repo):
    from flows.distill import DistillConfig
    from nexus_core.distill.prompts import load_template

    for name in ("base", "tiny", "scientific"):
        cfg = load_config(repo / f"configs/distill/{name}.yaml", DistillConfig)
        assert cfg.sources and cfg.inputs.templates
    assert load_config(repo / "configs/distill/tiny.yaml", DistillConfig).teacher.offline is True
    load_rules(repo / "configs/distill/filters.yaml")
    for p in (repo / "configs/distill/prompts").glob("*.yaml"):
        assert load_template(p.parent, p.stem).hash
    recorded = (repo / "configs/distill/recorded/tiny_teacher.jsonl").read_text().splitlines()
    assert recorded and all({"key", "response"} <= set(json.loads(line)) for line in recorded)


def test_editing_a_template_the_step_uses_misses_the_cache(data_root, tmp_path, repo):
    prompts = tmp_path / "prompts"
    shutil.copytree(repo / "configs/distill/prompts", prompts)
    first = _inputs(ABSTRACTS, templates=["hypothesis"], prompts_dir=str(prompts))
    (prompts / "methodology.yaml").write_text((prompts / "methodology.yaml").read_text() + "\n# unused here\n")
    again = _inputs(ABSTRACTS, templates=["hypothesis"], prompts_dir=str(prompts))
    assert again.reused and again.ref == first.ref  # a template the config does not name is not read
    hyp = prompts / "hypothesis.yaml"
    hyp.write_text(hyp.read_text().replace("hypothesis", "falsifiable hypothesis", 1))
    edited = _inputs(ABSTRACTS, templates=["hypothesis"], prompts_dir=str(prompts))
    assert not edited.reused and edited.ref.version == first.ref.version + 1


def test_regeneration_key_covers_its_template_rules_and_recorded_answers(tmp_path, repo):
    prompts = tmp_path / "prompts"
    shutil.copytree(repo / "configs/distill/prompts", prompts)
    rules = tmp_path / "filters.yaml"
    rules.write_text((repo / "configs/distill/filters.yaml").read_text())
    recorded = tmp_path / "recorded.jsonl"
    recorded.write_text((repo / "configs/distill/recorded/tiny_teacher.jsonl").read_text())
    cfg = RegenerateConfig(prompts_dir=str(prompts), rules=str(rules),
                           teacher=TeacherConfig(offline=True, recorded_cache=[str(recorded)]))
    keys = [step_key(run_regenerate, cfg, {})]
    for path in (prompts / "hypothesis.yaml", prompts / "strict.yaml", rules, recorded):
        path.write_text(path.read_text() + "\n")
        keys.append(step_key(run_regenerate, cfg, {}))
    assert keys[1] == keys[0]  # regeneration reads only its own (strict) template
    assert len(set(keys[1:])) == 4  # the strict template, the rules and the recorded answers each count
