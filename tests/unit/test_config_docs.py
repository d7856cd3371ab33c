"""nexus_core.config_docs: option tables generated from config models, and the marked README block."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

from nexus_core.config import NexusModel, runtime_field
from nexus_core.config_docs import (
    current_block,
    default_marker,
    main,
    option_rows,
    options_table,
    replace_block,
)


class Inner(NexusModel):
    """A nested section."""

    rank: int = Field(default=16, description="LoRA rank")
    targets: list[str] = Field(default=["to_q", "to_out.0"], description="Modules")


class Item(NexusModel):
    """One entry of a list section."""

    path: str = Field(description="Where it is")
    repeats: int = Field(default=1, description="How often")


class Outer(NexusModel):
    """The top of a config."""

    name: str = Field(default="flux", description="Run name")
    mode: Literal["lora", "full"] = Field(default="lora", description="What to train")
    loss: Literal["mse", "l1"] = Field(default="mse", description="mse | l1")
    inner: Inner = Field(default_factory=Inner, description="Inner section")
    maybe: Inner | None = Field(default=None, description="Optional section")
    items: list[Item] = Field(default_factory=list, description="More inputs")
    prompt: str = Field(default="", description="Empty by default")
    workers: int = runtime_field(4, "Threads")


def test_sections_become_dotted_keys_with_yaml_defaults():
    rows = {key: (default, desc) for key, default, desc in option_rows(Outer)}
    assert list(rows) == ["name", "mode", "loss", "inner", "inner.rank", "inner.targets", "maybe", "maybe.rank",
                          "maybe.targets", "items", "items[].path", "items[].repeats", "prompt", "workers"]
    assert rows["name"] == ("`flux`", "Run name")
    assert rows["inner"] == ("(section)", "Inner section")
    assert rows["maybe"][0] == "`null` (section)"
    assert rows["inner.targets"][0] == '`["to_q", "to_out.0"]`'
    assert rows["items"][0] == "`[]`" and rows["items[].path"][0] == "required"
    assert rows["prompt"][0] == '`""`'
    assert rows["workers"] == ("`4`", "Threads *(runtime: not in cache keys)*")


def test_literal_choices_are_added_unless_listed_and_pipes_are_escaped():
    rows = {key: desc for key, _, desc in option_rows(Outer)}
    assert rows["mode"] == "What to train (one of: lora, full)"
    assert rows["loss"] == "mse \\| l1"


def test_table_and_marked_block_round_trip():
    table = options_table(Outer)
    assert table.splitlines()[:2] == ["| key | default | description |", "|---|---|---|"]
    assert "| `inner.rank` | `16` | LoRA rank |" in table
    text = "# Title\n\n<!-- x-options:start -->\nold\n<!-- x-options:end -->\n\nafter\n"
    new = replace_block(text, "x-options", table)
    assert current_block(new, "x-options") == table
    assert new.startswith("# Title\n\n<!-- x-options:start -->\n| key |") and new.endswith("<!-- x-options:end -->\n\nafter\n")
    assert replace_block(new, "x-options", table) == new  # regenerating is a no-op
    with pytest.raises(ValueError, match="markers"):
        replace_block("no markers", "x-options", table)


def test_cli_check_fails_with_the_regenerate_command_and_write_fixes_it(tmp_path, capsys):
    spec = f"{__name__}:Outer"
    name = default_marker(spec)
    assert name == "test_config_docs-options" and default_marker("flows.flux:FluxConfig") == "flux-options"
    readme = tmp_path / "README.md"
    readme.write_text(f"<!-- {name}:start -->\nstale\n<!-- {name}:end -->\n")
    assert main([spec, "--check", str(readme)]) == 1
    err = capsys.readouterr().err
    assert f"run: python -m nexus_core.config_docs {spec} --write {readme}" in err
    assert main([spec, "--write", str(readme)]) == 0
    assert main([spec, "--check", str(readme)]) == 0
    assert current_block(readme.read_text(), name) == options_table(Outer)
