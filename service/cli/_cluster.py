"""`ratebench cluster up|add|env|status|down`: a Ray cluster of several nodes on this machine,
everything on 127.0.0.1 (`service.local_cluster`), to try the distributed deployment without
Docker: the scheduler joins it (`eval "$(ratebench cluster env)"`), the API runs beside it."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from service.cli._common import CliError, SubParsers


def register(subparsers: SubParsers) -> None:
    cluster = subparsers.add_parser(
        "cluster", help="start, describe and stop a local multi-node Ray cluster on 127.0.0.1"
    )
    actions = cluster.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start a head and more nodes (token auth, no dashboard)")
    up.add_argument("--nodes", type=int, default=2, help="nodes, the head included (default 2)")
    up.add_argument(
        "--cpus", type=int, help="CPUs each node offers (default: this machine's CPUs / nodes)"
    )
    up.add_argument(
        "--timeout", type=float, default=180.0, help="seconds one node may take to start (180)"
    )
    add = actions.add_parser("add", help="start one more node and join it to the head")
    add.add_argument("--cpus", type=int, default=1, help="CPUs the node offers (default 1)")
    add.add_argument(
        "--timeout", type=float, default=180.0, help="seconds the node may take to start (180)"
    )
    env = actions.add_parser("env", help="print the variables a driver needs, for eval")
    status = actions.add_parser("status", help="the nodes and whether they run")
    down = actions.add_parser("down", help="stop exactly the processes `up` started")
    for parser, handler in (
        (up, _up), (add, _add), (env, _env), (status, _status), (down, _down)
    ):  # fmt: skip
        parser.add_argument(
            "--dir", type=Path, help="where the cluster's state lives (default <data dir>/cluster)"
        )
        parser.set_defaults(handler=handler)


def _folder(args: argparse.Namespace) -> Path:
    if args.dir is not None:
        return Path(args.dir)
    from service.config import get_settings

    return get_settings().data_dir / "cluster"


def _load(args: argparse.Namespace) -> object:
    from service.local_cluster import ClusterError, LocalCluster

    try:
        return LocalCluster.load(_folder(args))
    except ClusterError as exc:
        raise CliError(str(exc)) from None


def _up(args: argparse.Namespace) -> int:
    from service.local_cluster import ClusterError, LocalCluster

    if not 1 <= args.nodes <= 16:
        raise CliError(f"--nodes: {args.nodes}; from 1 to 16")
    cpus = args.cpus if args.cpus is not None else max(1, (os.cpu_count() or 1) // args.nodes)
    if cpus < 1:
        raise CliError(f"--cpus: {cpus}; at least 1")
    try:
        cluster = LocalCluster.up(_folder(args), args.nodes, cpus, args.timeout)
    except ClusterError as exc:
        raise CliError(str(exc)) from None
    print(f"Ray cluster up: {len(cluster.nodes)} nodes of {cpus} CPUs on 127.0.0.1, head at "
          f"{cluster.address} (token auth)")  # fmt: skip
    print(f'join it: eval "$(ratebench cluster env{_dir_option(args)})"; '
          f"stop it: ratebench cluster down{_dir_option(args)}")  # fmt: skip
    return 0


def _add(args: argparse.Namespace) -> int:
    from service.local_cluster import ClusterError, LocalCluster

    if args.cpus < 1:
        raise CliError(f"--cpus: {args.cpus}; at least 1")
    cluster = _load(args)
    assert isinstance(cluster, LocalCluster)
    try:
        node = cluster.add(args.cpus, args.timeout)
    except ClusterError as exc:
        raise CliError(str(exc)) from None
    print(f"{node.name} joined {cluster.address} with {node.cpus} CPUs")
    return 0


def _dir_option(args: argparse.Namespace) -> str:
    return "" if args.dir is None else f" --dir {shlex.quote(str(args.dir))}"


def _env(args: argparse.Namespace) -> int:
    from service.local_cluster import LocalCluster

    cluster = _load(args)
    assert isinstance(cluster, LocalCluster)
    exports = " ".join(f"{name}={shlex.quote(value)}" for name, value in cluster.env().items())
    print(f"export {exports}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from service.local_cluster import LocalCluster

    cluster = _load(args)
    assert isinstance(cluster, LocalCluster)
    print(f"head {cluster.address}")
    for node in cluster.status():
        state = "running" if node["running"] else "stopped"
        print(f"{node['node']}: {state}, {node['cpus']} CPUs, {node['processes']} processes")
    return 0


def _down(args: argparse.Namespace) -> int:
    from service.local_cluster import LocalCluster

    cluster = _load(args)
    assert isinstance(cluster, LocalCluster)
    stopped = cluster.down()
    print(f"Ray cluster down: {len(stopped)} processes of {len(cluster.nodes)} nodes stopped")
    return 0
