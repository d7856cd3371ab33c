"""The README's Flux section lists every option of the flux flow's config with its default."""

from __future__ import annotations

from pathlib import Path

from flows.flux import FluxConfig
from nexus_core.config_docs import current_block, options_table, regenerate_command

REPO = Path(__file__).resolve().parents[2]


def test_readme_flux_option_table_matches_the_config_models():
    block = current_block((REPO / "README.md").read_text(encoding="utf-8"), "flux-options")
    command = regenerate_command("flows.flux:FluxConfig", "README.md")
    assert block is not None, f"README.md has no <!-- flux-options:start/end --> block; add the markers, then run: {command}"
    expected = options_table(FluxConfig)
    if block != expected:
        have, want = set(block.splitlines()), set(expected.splitlines())
        changed = sorted(want - have)[:10] + [f"(stale) {line}" for line in sorted(have - want)[:10]]
        raise AssertionError("README.md's Flux option table is out of date with the config models; regenerate it "
                             f"with (from the repository root):\n    {command}\nrows that differ:\n" + "\n".join(changed))

