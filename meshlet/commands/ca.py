"""`meshlet ca init --dir DIR`: create the mesh root CA that workload certificates chain to."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from meshlet.commands import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ca",
        help="manage the mesh CA (ca init)",
        description="Manage the mesh certificate authority.",
    )
    actions = parser.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init",
        help="create a root CA (ECDSA P-256, 10 years) in DIR",
        description="Create DIR/ca.pem and DIR/ca-key.pem (mode 0600). Refuses to overwrite an existing CA.",
        epilog="example: meshlet ca init --dir ./mesh-ca",
    )
    init.add_argument("--dir", required=True, type=Path, metavar="DIR", help="where to write ca.pem and ca-key.pem")
    init.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from meshlet.mtls.ca import new_authority
    from meshlet.mtls.files import IdentityError, write_authority

    authority = new_authority(dt.datetime.now(dt.UTC))
    try:
        write_authority(args.dir, authority)
    except IdentityError as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        raise CommandError(f"cannot write CA into {args.dir}: {e.strerror}") from None
    print(f"{args.dir}: mesh CA created, valid until {authority.cert.not_valid_after_utc:%Y-%m-%d} "
          f"(serial {authority.cert.serial_number:x})")
    return 0
