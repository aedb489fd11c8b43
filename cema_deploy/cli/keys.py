"""``cema-deploy keys``: make and inspect the Ed25519 key pair that signs refit blobs.

The cloud keeps ``cema-signing.key`` (mode 0600) and signs every blob it sends; each edge is given
``cema-signing.pub`` and applies only blobs that verify against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

keys_app = typer.Typer(
    help="Make and inspect the Ed25519 key pair that signs refit blobs (cloud: private key; edge: public key).",
    no_args_is_help=True,
)


@keys_app.command("new")
def new_cmd(
    out: Annotated[Path, typer.Option("--out", help="Directory for cema-signing.key and cema-signing.pub.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair in --out.")] = False,
) -> None:
    """Create a signing key pair: cema-signing.key (private, mode 0600) and cema-signing.pub; print the key id.

    Example: cema-deploy keys new --out keys/
    """
    from cema_deploy.contract.signing import key_id, load_public_key, new_key_pair

    private_path, public_path = new_key_pair(out, overwrite=force)
    typer.echo(f"key id:      {key_id(load_public_key(public_path))}")
    typer.echo(f"private key: {private_path} (mode 0600; keep it on the cloud, never on an edge)")
    typer.echo(f"public key:  {public_path} (give it to every edge that must trust this cloud)")


@keys_app.command("show")
def show_cmd(
    public_key: Annotated[Path, typer.Argument(help="A public key file (cema-signing.pub).")],
) -> None:
    """Print the algorithm and key id of a public key file (the id a signed blob names in its key_id field)."""
    from cema_deploy.contract.signing import key_id, load_public_key

    key = load_public_key(public_key)
    typer.echo(f"file:      {public_key}")
    typer.echo("algorithm: Ed25519")
    typer.echo(f"key id:    {key_id(key)}")
