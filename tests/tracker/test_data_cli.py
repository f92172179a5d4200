"""`mailtally tracker-data update/show`: a fresher list is installed and used."""

from __future__ import annotations

from click.testing import CliRunner

import cli
from tracker import service


def test_update_from_file_is_used_by_the_rules(settings, tmp_path):
    csv = tmp_path / "egress-ip-ranges.csv"
    csv.write_text("172.224.226.0/27,GB,GB-EN,London,\n2a02:26f7:b3c0:4000::/64,GB,GB-EN,London,\n")
    runner = CliRunner()
    args = ["--config", str(settings.config_path), "tracker-data"]
    result = runner.invoke(cli.main, [*args, "update", "apple-relay", "--source", str(csv)])
    assert result.exit_code == 0, result.output
    assert "Installed 2 networks" in result.output
    rules = service.build_rules(settings)
    assert "172.224.226.5" in rules.apple and "17.1.1.1" not in rules.apple
    shown = runner.invoke(cli.main, [*args, "show", "--format", "csv"])
    assert "tracker-data/apple_relay.txt" in shown.output
    empty = tmp_path / "empty.csv"
    empty.write_text("prefix,country\n")
    bad = runner.invoke(cli.main, [*args, "update", "apple-relay", "--source", str(empty)])
    assert bad.exit_code == 1 and bad.output.startswith("Error: apple-relay: no networks")
