"""`meshlet ca init --dir DIR`: create the mesh root CA that workload certificates chain to;
`meshlet ca rotate --dir DIR`: replace it without an outage (meshlet.mtls.cadir)."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from meshlet.commands import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ca",
        help="manage the mesh CA (ca init, ca rotate)",
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
    rotate = actions.add_parser(
        "rotate",
        help="add a new CA to the trust bundle; it signs after a grace period",
        description="Write a new CA into DIR (next.pem, next-key.pem), add it to DIR/bundle.pem (what sidecars "
        "trust) and arm the switch: `meshlet identity serve` signs with it from now + GRACE, by then every sidecar "
        "has the new bundle. Once every certificate of the old CA has expired (one workload TTL after the switch), "
        "--finish makes the new CA the only one.",
        epilog="example: meshlet ca rotate --dir ./mesh-ca --grace 10m; later: meshlet ca rotate --dir ./mesh-ca "
        "--finish",
    )
    rotate.add_argument("--dir", required=True, type=Path, metavar="DIR", help="the CA dir")
    rotate.add_argument("--grace", default="10m", metavar="DURATION",
                        help="how long sidecars have to pick up the new bundle before it signs (default 10m)")
    rotate.add_argument("--finish", action="store_true", help="end a rotation: drop the old CA")
    rotate.set_defaults(handler=run_rotate)


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


def run_rotate(args: argparse.Namespace) -> int:
    from meshlet.mtls.cadir import finish_rotation, rotate
    from meshlet.mtls.files import IdentityError
    from meshlet.policy.values import parse_duration

    now = dt.datetime.now(dt.UTC)
    try:
        if args.finish:
            state = finish_rotation(args.dir, now)
            print(f"{args.dir}: rotation finished; CA serial {state.current.cert.serial_number:x} is the only one")
            return 0
        grace = dt.timedelta(seconds=parse_duration(args.grace))
        state = rotate(args.dir, now, grace)
    except (IdentityError, ValueError) as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        raise CommandError(f"cannot write into {args.dir}: {e.strerror}") from None
    assert state.next is not None and state.next_from is not None
    print(f"{args.dir}: new CA serial {state.next.cert.serial_number:x} added to bundle.pem ({len(state.bundle)} CAs); "
          f"it signs from {state.next_from:%Y-%m-%dT%H:%M:%SZ}")
    return 0
