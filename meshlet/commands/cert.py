"""`meshlet cert issue`: mint a workload identity (cert.pem, key.pem, ca.pem) from the mesh CA."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from meshlet.commands import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cert",
        help="issue workload certificates (cert issue)",
        description="Issue workload certificates signed by the mesh CA.",
    )
    actions = parser.add_subparsers(dest="cert_command", metavar="ACTION", required=True)
    issue = actions.add_parser(
        "issue",
        help="issue a certificate for a SPIFFE ID into an identity dir",
        description="Write OUT/cert.pem (URI SAN = the SPIFFE ID), OUT/key.pem (0600) and OUT/ca.pem "
        "(the trust bundle): the dir `meshlet run --identity` takes. Re-issuing into the same dir "
        "rotates the identity of a running sidecar.",
        epilog="example: meshlet cert issue --ca ./mesh-ca --spiffe spiffe://cluster.local/ns/default/sa/reviews "
        "--out ./reviews-id --ttl 24h",
    )
    issue.add_argument("--ca", required=True, type=Path, metavar="DIR", help="CA dir made by `meshlet ca init`")
    issue.add_argument("--spiffe", required=True, metavar="ID", help="spiffe://TRUST_DOMAIN/ns/NS/sa/SA")
    issue.add_argument("--out", required=True, type=Path, metavar="DIR", help="identity dir to write")
    issue.add_argument("--ttl", default="24h", metavar="DURATION", help="lifetime, e.g. 24h, 90m (default 24h)")
    issue.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from meshlet.mtls.ca import issue_workload
    from meshlet.mtls.files import IdentityError, read_authority, write_identity
    from meshlet.policy.values import parse_duration, parse_spiffe_id

    try:
        spiffe_id = parse_spiffe_id(args.spiffe)
        ttl = parse_duration(args.ttl)
    except ValueError as e:
        raise CommandError(str(e)) from None
    try:
        authority = read_authority(args.ca)
        issued = issue_workload(authority, spiffe_id, dt.datetime.now(dt.UTC), ttl)
        write_identity(args.out, issued, authority.cert)
    except (IdentityError, ValueError) as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        raise CommandError(f"cannot write identity into {args.out}: {e.strerror}") from None
    print(f"{args.out}: {spiffe_id} serial {issued.cert.serial_number:x} "
          f"valid until {issued.cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    return 0
