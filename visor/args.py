"""Edits to a node binary's argv. Exact matches only: `--home` never matches `--homes`."""

SNAPSHOT_FLAG = "--snapshot.load-from-block-height"


def has_flag(args: list[str] | tuple[str, ...], flag: str) -> bool:
    """True when an argument is the flag itself or `flag=value`."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def with_flag(args: list[str] | tuple[str, ...], flag: str, value: str) -> list[str]:
    """args with `flag value` appended, unless an argument already names the flag."""
    return list(args) if has_flag(args, flag) else [*args, flag, value]


def flag_value(args: list[str] | tuple[str, ...], flag: str) -> str | None:
    """The value given to a flag (`--flag v` or `--flag=v`), or None."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def segment_query(data_node_args: list[str] | tuple[str, ...]) -> list[str]:
    """Args that ask a data node for its latest history segment, as the Go visor builds them."""
    query = ["network-history", "latest-history-segment", "--output=json"]
    if data_node_args and data_node_args[0] == "datanode":
        query.insert(0, "datanode")
    home = flag_value(data_node_args, "--home")
    if home is not None:
        query += ["--home", home]
    return query
