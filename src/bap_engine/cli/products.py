"""`bap-engine products show|delete|rotate-key PRODUCT`: one product, over HTTP (admin key).

`show` prints the product with its engine count (warm pool included); `delete` destroys the product
and every engine of it with their data (it asks first on a terminal; elsewhere it needs --yes, else
exit 2 and nothing is deleted); `rotate-key` gives the product a new platform key, printed once on
stdout (a warning on stderr says it is not shown again), the old one working --overlap seconds more.
PRODUCT is an id, a unique id prefix or a slug. `products list|policy` are in remote.py.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from bap_engine.cli import render
from bap_engine.cli.common import EXIT_USAGE, AdminKey, AsJson, Url, Wide, client, fail, resolve_product
from bap_engine.client import DEFAULT_URL, ServiceUnavailable

__all__ = ["products_show", "products_delete", "products_rotate_key"]

MAX_OVERLAP_S = 86_400  # what the server accepts (bap_engine.fleet.MAX_KEY_OVERLAP_S; it checks too)
ProductArg = Annotated[str, typer.Argument(metavar="PRODUCT", help="id, id prefix or slug")]


def _interactive() -> bool:
    """Whether the user can be asked (stdin and stderr, where the question goes, are terminals)."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def products_show(product: ProductArg, url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False,
                  wide: Wide = False) -> None:
    """One product: slug, name, engines (warm pool included), creation time and policy (admin key)."""
    with client(url, None, admin_key) as c:
        found = c.get_product(resolve_product(c, product) or product)
    if as_json:
        render.emit_json({"product_id": found.product_id, "slug": found.slug, "display_name": found.display_name,
                          "policy": found.policy, "created_at": found.created_at, "engines": found.engines})
        return
    render.show(render.product_detail(found, wide))


def products_delete(product: ProductArg, url: Url = DEFAULT_URL, admin_key: AdminKey = None,
                    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask (needed without a "
                                                                           "terminal)")] = False,
                    as_json: AsJson = False) -> None:
    """Delete a product and every engine of it with their data; its platform key stops working at once."""
    if not yes and not _interactive():
        fail("products delete destroys the product and all its engines: pass --yes to confirm (no terminal "
             "to ask on)", EXIT_USAGE)
    with client(url, None, admin_key) as c:
        pid = resolve_product(c, product) or product
        if not yes:
            found = c.get_product(pid)
            typer.confirm(f"Delete product {render.safe(found.slug)} ({render.short_id(pid, False)}) and its "
                          f"{found.engines or 0} engine(s) with their data?", abort=True, err=True)
        try:
            with render.err().status(f"deleting {render.safe(product)}…"):
                done = c.delete_product(pid)
        except ServiceUnavailable as e:
            fail(f"{e.code}: {e.message} (the product is deleted; the server finishes destroying its engines: "
                 "run `products delete` again to resume)")
    if as_json:
        render.emit_json(done)
        return
    count = done.engines_destroyed
    typer.echo(f"product {render.safe(product)} deleted ({count} engine{'' if count == 1 else 's'} destroyed)")


def products_rotate_key(product: ProductArg, url: Url = DEFAULT_URL, admin_key: AdminKey = None,
                        overlap: Annotated[int, typer.Option("--overlap", min=0, max=MAX_OVERLAP_S,
                                                             metavar="SECONDS",
                                                             help="how long the old key keeps working")] = 0,
                        as_json: AsJson = False) -> None:
    """Give the product a new platform key, printed only this once (the old one works --overlap seconds)."""
    with client(url, None, admin_key) as c:
        rotated = c.rotate_platform_key(resolve_product(c, product) or product, overlap)
    if as_json:
        render.emit_json({"product_id": rotated.product_id, "platform_api_key": rotated.platform_api_key})
    else:
        typer.echo(f"platform key of {render.safe(product)} rotated")
        typer.echo(f"new key: {render.safe(rotated.platform_api_key)}")  # (fits 80 columns: 9 + 51)
    old = "is refused from now on" if overlap == 0 else f"keeps working {overlap}s"
    typer.echo(f"bap-engine: the platform key is shown only once: store it now (the old one {old})", err=True)
