"""Edits to node argv: exact flag matches, the snapshot flag, the data node's segment query."""

from visor.args import SNAPSHOT_FLAG, flag_value, has_flag, segment_query, with_flag


def test_the_snapshot_flag_is_appended_unless_already_named():
    assert with_flag(["node"], SNAPSHOT_FLAG, "120") == ["node", SNAPSHOT_FLAG, "120"]
    assert with_flag(["node", SNAPSHOT_FLAG, "7"], SNAPSHOT_FLAG, "120") == ["node", SNAPSHOT_FLAG, "7"]
    assert with_flag(["node", f"{SNAPSHOT_FLAG}=7"], SNAPSHOT_FLAG, "120") == ["node", f"{SNAPSHOT_FLAG}=7"]


def test_flags_match_exactly():
    assert not has_flag(["--homes", "x"], "--home")
    assert has_flag(["--home=x"], "--home")
    assert flag_value(["--home", "/d"], "--home") == "/d" and flag_value(["--home=/d"], "--home") == "/d"
    assert flag_value(["--home"], "--home") is None


def test_segment_query_follows_the_go_visor():
    assert segment_query(["datanode", "start", "--home", "/dn"]) == \
        ["datanode", "network-history", "latest-history-segment", "--output=json", "--home", "/dn"]
    assert segment_query(["start"]) == ["network-history", "latest-history-segment", "--output=json"]
