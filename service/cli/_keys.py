"""`ratebench keys create|list|revoke`: manage API keys directly in the database."""

from __future__ import annotations

import argparse

from service.cli._common import CliError, SubParsers, add_database_option, open_database


def register(subparsers: SubParsers) -> None:
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a key (printed once; only its hash is kept)")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument(
        "--admin",
        action="store_true",
        help="the key may also cancel other keys' studies (default: only its own)",
    )
    add_database_option(create)
    create.set_defaults(handler=_create)
    listing = actions.add_parser("list", help="list keys (ids, names, prefixes, state)")
    add_database_option(listing)
    listing.set_defaults(handler=_list)
    revoke = actions.add_parser("revoke", help="revoke a key by id, and cancel its queued studies")
    revoke.add_argument("id", type=int, help="the key's id, as `keys list` shows it")
    add_database_option(revoke)
    revoke.set_defaults(handler=_revoke)


def _create(args: argparse.Namespace) -> int:
    from service.auth import create_key

    with open_database(args) as session:
        try:
            created = create_key(session, args.name, admin=args.admin)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    print(created.key)
    return 0


def _list(args: argparse.Namespace) -> int:
    from service.auth import list_keys

    with open_database(args) as session:
        for row in list_keys(session):
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
            role = "admin" if row.is_admin else "key"
            print(f"{row.id}\t{row.prefix}…\t{row.name}\t{role}\t{state}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    """Revoke the key and cancel its queued studies, saying which; its running studies go on
    (`ratebench cancel ID` with an admin key stops one)."""
    from service.auth import revoke_key
    from service.queue import cancel_queued_of_key

    with open_database(args) as session:
        if not revoke_key(session, args.id):
            raise CliError(f"no key with id {args.id}")
        cancelled, running = cancel_queued_of_key(session, args.id)
    print(f"revoked key {args.id}")
    print(f"cancelled {len(cancelled)} queued studies" + "".join(f"\n  {i}" for i in cancelled))
    if running:
        print(f"{len(running)} running studies go on (stop one with `ratebench cancel ID` and an "
              "admin key):" + "".join(f"\n  {i}" for i in running))  # fmt: skip
    return 0
