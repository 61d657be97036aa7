import time
from tests.conftest import register_product, pk

async def test_smoke(client):
    r = await client.get("/health")
    print(r.status_code, r.text)
    pid, key = await register_product(client)
    t = time.monotonic()
    r = await client.post("/engines/provision", json={"user_id": "u1"}, headers=pk(key))
    print(r.status_code, r.text, time.monotonic() - t)
    r = await client.get("/engines/u1", headers=pk(key))
    print(r.text)
    r = await client.get("/engines/", headers=pk(key))
    print("slash", r.status_code, r.headers, r.text)
    r = await client.post("/engines/provision", content=b'{"user_id": "u2"}', headers={**pk(key), "transfer-encoding": "chunked"})
    print(r.status_code, r.text)
