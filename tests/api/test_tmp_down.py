import asyncpg
from tests.api.test_health import throwaway_database, _with_database
from tests.conftest import open_app, register_product, pk

async def test_down(settings, pg_dsn):
    async with throwaway_database(pg_dsn) as dsn:
        async with open_app(settings.model_copy(update={"database_url": dsn})) as (app, client):
            _, key = await register_product(client)
            admin = await asyncpg.connect(pg_dsn)
            await admin.execute(f'DROP DATABASE "{__import__("urllib.parse").parse.urlsplit(dsn).path[1:]}" WITH (FORCE)')
            await admin.close()
            for i in range(3):
                r = await client.get("/health"); print(r.status_code, r.text)
                r = await client.get("/engines", headers=pk(key)); print(r.status_code, r.text)
                r = await client.post("/engines/x/admit", headers=pk(key)); print(r.status_code, r.text)
