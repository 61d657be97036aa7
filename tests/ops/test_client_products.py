"""The client's product admin calls against a real `bap-engine serve`: get_product, delete_product,
rotate_platform_key (happy paths, 404s, what the old platform key gets afterwards)."""

from __future__ import annotations

import uuid

import pytest

from bap_engine.client import (
    AsyncBapClient,
    BapClient,
    InvalidPlatformKey,
    PlatformKey,
    Product,
    ProductDeletion,
    ProductNotFound,
    ValidationError,
)
from tests.ops.conftest import OpsProduct, OpsServer


def test_get_product(admin: BapClient, product: OpsProduct) -> None:
    found = admin.get_product(product.product_id)
    assert isinstance(found, Product)
    assert (found.product_id, found.slug, found.display_name) == (product.product_id, product.slug,
                                                                  "Ops test product")
    assert found.engines == 0 == found.total and found.created_at is not None and found.created_at.tzinfo
    assert isinstance(found.policy, dict)
    listed = next(p for p in admin.products() if p.product_id == product.product_id)
    assert listed.engines is None and listed.policy == found.policy  # the listing has no `engines`
    with pytest.raises(ProductNotFound):
        admin.get_product(str(uuid.uuid4()))


def test_delete_product_with_an_engine(ops_server: OpsServer, admin: BapClient, product: OpsProduct,
                                       bap: BapClient) -> None:
    bap.provision("pd-a")
    assert admin.get_product(product.product_id).engines == 1
    done = admin.delete_product(product.product_id)
    assert done == ProductDeletion(product_id=product.product_id, status="deleted", engines_destroyed=1)
    with pytest.raises(InvalidPlatformKey):
        bap.status()
    with pytest.raises(ProductNotFound):
        admin.get_product(product.product_id)
    assert product.product_id not in {p.product_id for p in admin.products()}
    with pytest.raises(ProductNotFound):
        admin.delete_product(str(uuid.uuid4()))


def test_rotate_platform_key_without_overlap(ops_server: OpsServer, admin: BapClient, product: OpsProduct) -> None:
    rotated = admin.rotate_platform_key(product.product_id)
    assert isinstance(rotated, PlatformKey)
    pid, key = rotated
    ops_server.secrets.append(key)
    assert pid == product.product_id and key != product.platform_key and key.startswith("pk-")
    assert key not in repr(rotated) and "platform_api_key" not in repr(rotated)
    with BapClient(ops_server.url, platform_key=product.platform_key) as old, pytest.raises(InvalidPlatformKey):
        old.status()
    with BapClient(ops_server.url, platform_key=key) as new:
        assert new.status().total == 0

    with pytest.raises(ProductNotFound):
        admin.rotate_platform_key(str(uuid.uuid4()))
    with pytest.raises(ValidationError):
        admin.rotate_platform_key(product.product_id, overlap_seconds=86_401)


def test_rotate_platform_key_with_overlap_keeps_the_old_key(ops_server: OpsServer, admin: BapClient,
                                                            product: OpsProduct) -> None:
    _, key = admin.rotate_platform_key(product.product_id, overlap_seconds=300)
    ops_server.secrets.append(key)
    for k in (product.platform_key, key):
        with BapClient(ops_server.url, platform_key=k) as b:
            assert b.status().total == 0


async def test_async_product_calls(ops_server: OpsServer, product: OpsProduct) -> None:
    async with AsyncBapClient(ops_server.url, admin_key=ops_server.admin_key) as admin:
        assert (await admin.get_product(product.product_id)).slug == product.slug
        rotated = await admin.rotate_platform_key(product.product_id)
        ops_server.secrets.append(rotated.platform_api_key)
        done = await admin.delete_product(product.product_id)
        assert done.engines_destroyed == 0 and done.status == "deleted"
        with pytest.raises(ProductNotFound):
            await admin.get_product(product.product_id)
