"""Podcast scripts: the strict parser, the check step as a filter (rows are data), timings and WAVs."""

from __future__ import annotations

import json
import wave

import polars as pl
import pytest

from nexus_core.artifacts import raw_ref
from nexus_core.errors import InputError
from nexus_core.podcast.check import ScriptCheckConfig, run_script_check
from nexus_core.podcast.script import ScriptRules, parse_script, render_script
from nexus_core.podcast.speech import SpeechConfig, Voice, run_speech
from nexus_core.podcast.tts import TinyTTSConfig, run_tiny_tts
from nexus_core.runner import run_step

RULES = ScriptRules(min_turns=4)
GOOD = "HOST: Welcome back.\nGUEST: Thanks for having me.\n\nHOST: So, what did you find?\nGUEST: Fish help reefs."


def test_a_good_script_parses_into_turns_in_the_configs_spelling():
    p = parse_script("**host:** Welcome back.\nGuest: Thanks.\nHOST: So?\nGUEST: Fish help reefs.", RULES)
    assert p.ok and [t.speaker for t in p.turns] == ["HOST", "GUEST", "HOST", "GUEST"]
    assert p.turns[0].text == "Welcome back."
    assert render_script(parse_script(GOOD, RULES).turns).splitlines()[2] == "HOST: So, what did you find?"


@pytest.mark.parametrize(("text", "reason"), [
    (None, "no_script"),
    ("   \n ", "no_script"),
    ("Here is your podcast!\n" + GOOD, "unparseable_line"),
    (GOOD + "\n[laughter]", "unparseable_line"),
    (GOOD + "\nHOST:", "unparseable_line"),  # a speaker who says nothing
    (GOOD.replace("GUEST:", "NARRATOR:", 1), "unknown_speaker"),
    ("HOST: one.\nHOST: two.\nHOST: three.\nHOST: four.", "one_speaker"),
    ("HOST: hi.\nGUEST: hello.", "too_few_turns"),
    ("HOST: " + "word " * 200 + "\nGUEST: ok.\nHOST: ok.\nGUEST: ok.", "turn_too_long"),
])
def test_bad_scripts_are_rejected_with_a_reason(text, reason):
    p = parse_script(text, RULES)
    assert not p.ok and p.reason == reason and p.turns == []
    assert p.detail


def test_speakers_must_be_two_distinct_names():
    with pytest.raises(ValueError):
        ScriptRules(speakers=["HOST", "host"])
    with pytest.raises(ValueError):
        ScriptRules(speakers=["HOST"])


def _filtered(tmp_path, texts):
    n = len(texts)
    df = pl.DataFrame({"row_id": [f"r{i}" for i in range(n)], "response": texts, "keep": [True] * (n - 1) + [False],
                       "reasons": [[] for _ in range(n - 1)] + [["too_short"]],
                       "reason": [""] * (n - 1) + ["too_short"]})
    (tmp_path / "rows").mkdir()
    df.write_parquet(tmp_path / "rows" / "data.parquet")
    return raw_ref(tmp_path / "rows")


def test_check_step_folds_the_parse_into_keep_and_reasons(data_root, tmp_path):
    ref = _filtered(tmp_path, [GOOD, "HOST: a.\nHOST: b.\nHOST: c.\nHOST: d.", "Just prose, no speakers.", "x"])
    res = run_step(run_script_check, ScriptCheckConfig(), name="check", inputs={"rows": ref})
    out = pl.read_parquet(res.ref.path / "data.parquet")
    assert out["keep"].to_list() == [True, False, False, False]
    assert out["reason"].to_list() == ["", "one_speaker", "unparseable_line", "too_short; unparseable_line"]
    assert json.loads(out["script_json"][0])[1] == {"speaker": "GUEST", "text": "Thanks for having me."}
    assert res.kept == 1 and res.usable == 1 and res.reasons == {"one_speaker": 1, "unparseable_line": 2}


def test_final_check_rejects_what_regeneration_let_through(data_root, tmp_path):
    df = pl.DataFrame({"row_id": ["a", "b"], "final_output": [GOOD.replace("HOST:", "**HOST:**"), "GUEST: alone."],
                       "final_keep": [True, True], "final_reasons": ["", ""]})
    (tmp_path / "regen").mkdir()
    df.write_parquet(tmp_path / "regen" / "data.parquet")
    res = run_step(run_script_check, ScriptCheckConfig(stage="final"), name="final",
                   inputs={"rows": raw_ref(tmp_path / "regen")})
    out = pl.read_parquet(res.ref.path / "data.parquet")
    assert out["final_keep"].to_list() == [True, False]
    assert out["final_reasons"].to_list() == ["", "one_speaker"]
    assert out["final_output"][0].startswith("HOST: Welcome back.")  # normalised: what SFT trains on


def test_check_step_refuses_a_table_without_the_columns(data_root, tmp_path):
    (tmp_path / "t").mkdir()
    pl.DataFrame({"row_id": ["a"], "text": ["x"]}).write_parquet(tmp_path / "t" / "data.parquet")
    with pytest.raises(InputError, match="response"):
        run_step(run_script_check, ScriptCheckConfig(), name="bad", inputs={"rows": raw_ref(tmp_path / "t")})


def test_speech_pads_short_turns_times_every_turn_and_writes_readable_wavs(data_root, tmp_path):
    tts = run_step(run_tiny_tts, TinyTTSConfig(speaking_rate=1000.0), name="tts")  # near-zero durations
    turns = [{"speaker": "HOST", "text": "Hi there."}, {"speaker": "GUEST", "text": "Hello."},
             {"speaker": "HOST", "text": "Bye."}, {"speaker": "GUEST", "text": "Bye!"}]
    df = pl.DataFrame({"row_id": ["a", "b", "c"], "title": ["T", "U", "V"], "final_keep": [True, False, True],
                       "final_reasons": ["", "one_speaker", ""],
                       "script_json": [json.dumps(turns), None, json.dumps([{"speaker": "HOST", "text": "..."}])]})
    (tmp_path / "s").mkdir()
    df.write_parquet(tmp_path / "s" / "data.parquet")
    cfg = SpeechConfig(min_line_s=0.5, pause_s=0.2)
    res = run_step(run_speech, cfg, name="ep", inputs={"scripts": raw_ref(tmp_path / "s"), "tts": tts.ref})
    table = pl.read_parquet(res.ref.path / "data.parquet")
    assert table["status"].to_list() == ["ok", "skipped", "failed"]
    assert table["reason"][1] == "one_speaker" and "nothing the voice can say" in table["reason"][2]
    rec = json.loads((res.ref.path / "episodes" / "0000.json").read_text())
    starts, ends = [t["start_s"] for t in rec["turns"]], [t["end_s"] for t in rec["turns"]]
    assert all(e - s >= 0.5 - 1e-3 for s, e in zip(starts, ends, strict=True))  # padded up to min_line_s
    assert all(abs(starts[i + 1] - ends[i] - 0.2) < 2e-3 for i in range(3))  # the pause between turns
    assert any(t["padded_s"] > 0 for t in rec["turns"])
    with wave.open(str(res.ref.path / rec["wav"]), "rb") as fh:
        assert fh.getnchannels() == 1 and fh.getsampwidth() == 2 and fh.getframerate() == 16000
        assert abs(fh.getnframes() / 16000 - ends[-1]) < 2e-3
    assert rec["voices"]["GUEST"]["speaker_id"] == 1
    again = run_step(run_speech, cfg, name="ep2", inputs={"scripts": raw_ref(tmp_path / "s"), "tts": tts.ref})
    assert (again.ref.path / rec["wav"]).read_bytes() == (res.ref.path / rec["wav"]).read_bytes()  # seeded


def test_speech_refuses_a_speaker_id_the_model_does_not_have(data_root, tmp_path):
    tts = run_step(run_tiny_tts, TinyTTSConfig(), name="tts2")
    (tmp_path / "s").mkdir()
    pl.DataFrame({"row_id": ["a"], "final_keep": [True], "final_reasons": [""],
                  "script_json": ["[]"]}).write_parquet(tmp_path / "s" / "data.parquet")
    cfg = SpeechConfig(voices={"HOST": Voice(speaker_id=0), "GUEST": Voice(speaker_id=5)})
    with pytest.raises(InputError, match="GUEST.speaker_id: 5"):
        run_step(run_speech, cfg, name="bad", inputs={"scripts": raw_ref(tmp_path / "s"), "tts": tts.ref})


def test_every_speaker_needs_a_voice_before_anything_runs(repo):
    from flows.common import load_flow_config
    from flows.podcast import PodcastConfig
    from nexus_core.errors import ConfigError

    with pytest.raises(ConfigError, match="no voice for speaker"):
        load_flow_config(PodcastConfig, str(repo / "configs/podcast/tiny.yaml"), ["script.speakers=[HOST, ANNA]"])
