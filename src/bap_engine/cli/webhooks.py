"""`bap-engine webhook set|show|delete PRODUCT`: a product's webhook, the receiver of its events (admin key).

`set` prints the signing secret once (stdout; a warning on stderr says it is not shown again: a new
`set` makes a new one); `show` prints the URL and the delivery state, never the secret. PRODUCT is
an id, a unique id prefix or a slug.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bap_engine.cli import render
from bap_engine.cli.common import AdminKey, AsJson, Url, Wide, client, resolve_product
from bap_engine.client import DEFAULT_URL

__all__ = ["webhook_app"]

webhook_app = typer.Typer(no_args_is_help=True, help="A product's webhook: where its events are POSTed (admin key).")
Product = Annotated[str, typer.Argument(metavar="PRODUCT", help="id, id prefix or slug")]


@webhook_app.command("set")
def webhook_set(product: Product,
                target: Annotated[str, typer.Argument(metavar="URL", help="http(s) URL the events are POSTed to")],
                url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False) -> None:
    """Set the product's webhook; prints its new signing secret, shown only this once."""
    with client(url, None, admin_key) as c:
        pid = resolve_product(c, product) or product
        made = c.set_webhook(pid, target)
    if as_json:
        render.emit_json({"product_id": pid, "url": made.url, "secret": made.secret})
    else:
        typer.echo(f"webhook of {render.safe(product)}: {render.safe(made.url)}")
        typer.echo(f"secret: {render.safe(made.secret)}")
    typer.echo("bap-engine: the secret is shown only once: store it now (verify each request's X-Bap-Signature "
               "with it; `webhook set` again makes a new one)", err=True)


@webhook_app.command("show")
def webhook_show(product: Product, url: Url = DEFAULT_URL, admin_key: AdminKey = None, as_json: AsJson = False,
                 wide: Wide = False) -> None:
    """The product's webhook and its delivery state (never its secret)."""
    with client(url, None, admin_key) as c:
        pid = resolve_product(c, product) or product
        hook = c.get_webhook(pid)
    if as_json:
        render.emit_json({"product_id": pid, **_doc(hook)})
        return
    render.show(render.webhook_detail(pid if wide else render.short_id(pid, False), hook, wide))


def _doc(value: object) -> dict[str, object]:
    doc = render.plain(value)
    assert isinstance(doc, dict)
    return doc


@webhook_app.command("delete")
def webhook_delete(product: Product, url: Url = DEFAULT_URL, admin_key: AdminKey = None,
                   as_json: AsJson = False) -> None:
    """Remove the product's webhook: no more events are sent to it."""
    with client(url, None, admin_key) as c:
        pid = resolve_product(c, product) or product
        c.delete_webhook(pid)
    if as_json:
        render.emit_json({"product_id": pid, "status": "deleted"})
    else:
        typer.echo(f"webhook of {render.safe(product)} deleted")
