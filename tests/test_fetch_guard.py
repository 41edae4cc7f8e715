"""The fetch guard. Its decisions about private, link-local and metadata addresses are tested as
units with the resolver's answer given by the test: no packet goes to such an address. The
end-to-end tests use loopback targets outside the allow-list and a canary that must hear nothing."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from smi.fetch import FetchPolicy, FetchRefused, address_problem, check, guarded_stream
from smi.serve import ServerThread
from tests.conftest import png_bytes
from tests.helpers import order


def resolving_to(*addresses: str):
    async def resolver(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolver


PUBLIC = FetchPolicy(resolver=resolving_to("93.184.216.34"))


@pytest.mark.parametrize("address, problem", [
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"),
    ("fd00::1", "private"),
    ("::ffff:10.0.0.1", "private"),
    ("0.0.0.0", "private"),
    ("224.0.0.1", "public"),
    ("100.64.0.1", "public"),
])
def test_non_public_addresses_are_named(address, problem):
    assert problem in address_problem(address)


def test_public_addresses_pass():
    assert address_problem("93.184.216.34") is None
    assert address_problem("2606:2800:220:1:248:1893:25c8:1946") is None


@pytest.mark.parametrize("answer", [["10.0.0.1"], ["169.254.169.254"], ["fd00::1"], ["93.184.216.34", "127.0.0.1"]])
async def test_a_name_resolving_to_a_private_address_is_refused(answer):
    policy = FetchPolicy(resolver=resolving_to(*answer))
    with pytest.raises(FetchRefused, match="resolves to"):
        await check("https://images.example/cat.png", policy)


async def test_literal_addresses_and_schemes_and_ports():
    for url in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[fd00::1]/x"):
        with pytest.raises(FetchRefused):
            await check(url, PUBLIC)
    for url in ("file:///etc/passwd", "ftp://images.example/cat.png", "gopher://x/"):
        with pytest.raises(FetchRefused, match="only http and https"):
            await check(url, PUBLIC)
    with pytest.raises(FetchRefused, match="port 8080"):
        await check("http://images.example:8080/cat.png", PUBLIC)
    target, address = await check("https://images.example/cat.png", PUBLIC)
    assert address == "93.184.216.34" and target.host == "images.example"


async def test_allow_list_and_result_hosts():
    policy = FetchPolicy.parse("127.0.0.1:8100,internal.shop", "upsampler.com,.upsampler.com,127.0.0.1:8100")
    assert (await check("http://127.0.0.1:8100/cdn/x.png", policy))[1] is None
    with pytest.raises(FetchRefused, match="not one of the hosts"):
        await check("http://127.0.0.1:8101/cdn/x.png", policy)
    with pytest.raises(FetchRefused, match="not one of the hosts"):
        await check("https://evil.example/x.png", FetchPolicy.parse("", "upsampler.com,.upsampler.com"))
    cdn = FetchPolicy(only_hosts=frozenset({".upsampler.com"}), resolver=resolving_to("93.184.216.34"))
    assert (await check("https://cdn.upsampler.com/r.png", cdn))[1] == "93.184.216.34"
    with pytest.raises(FetchRefused):
        await check("https://upsampler.com.evil.example/r.png", cdn)


@pytest.fixture
def canary():
    """A loopback server outside every allow-list: it must never receive a request."""
    hits: list[str] = []
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "HEAD", "POST"])
    def anything(path: str, request: Request):
        hits.append(f"{request.method} /{path}")
        return Response(png_bytes(20, 20), media_type="image/png")

    with ServerThread(app) as server:
        server.hits = hits
        yield server


@pytest.fixture
def redirector(canary):
    """An allow-listed host that redirects to the canary."""
    app = FastAPI()

    @app.get("/img.png")
    def to_canary():
        return RedirectResponse(f"{canary.url}/stolen.png", status_code=302)

    with ServerThread(app) as server:
        yield server


async def test_redirect_to_a_port_outside_the_allow_list_is_refused(canary, redirector):
    policy = FetchPolicy.parse(redirector.url.split("//")[1])
    async with httpx.AsyncClient() as client:
        with pytest.raises(FetchRefused):
            async with guarded_stream(client, f"{redirector.url}/img.png", policy):
                pass
    assert canary.hits == []


async def test_storefront_urls_the_guard_refuses_start_nothing(dev_env, stack_factory, canary, redirector, shop):
    allowed = ",".join(server.url.split("//")[1] for server in (redirector, shop))  # not the canary
    stack = stack_factory(dev_env, fetch_allow_hosts=allowed)
    client = stack.client()
    for n, url in enumerate([
        f"{canary.url}/img.png",  # a loopback port outside the list
        f"http://localhost:{canary.port}/img.png",  # the same by name
        f"{redirector.url}/img.png",  # an allowed host that redirects there
    ]):
        reply = await asyncio.to_thread(client.post, "/v1/jobs", json=order(url, f"ssrf-{n}"))
        assert reply.status_code == 422, url
        assert reply.json()["error"]["code"] == "url_refused", url
        quote = await asyncio.to_thread(client.post, "/v1/quotes", json={"image_url": url, "scale_factor": 2})
        assert quote.status_code == 422, url
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/img.png"):
        assert (await asyncio.to_thread(client.post, "/v1/jobs", json=order(url, "ssrf-scheme"))).status_code == 422
    assert canary.hits == []
    admin = httpx.get(f"{stack.api.url}/v1/admin/jobs", headers={"Authorization": "Bearer test-admin-key"})
    assert admin.json()["jobs"] == []
    # The allowed shop itself still works.
    fine = await asyncio.to_thread(client.post, "/v1/quotes", json={"image_url": stack.shop.publish(png_bytes(8, 8)),
                                                                     "scale_factor": 2})
    assert fine.status_code == 200


async def test_hostile_images_are_refused_before_anything_starts(dev_env, stack_factory):
    import io

    from PIL import Image

    stack = stack_factory(dev_env)
    client = stack.client()
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 400 megapixels in a few dozen kilobytes
    cases = {
        "decompression bomb": (bomb.getvalue(), "output_too_large"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000"/>', "unsupported_format"),
        "zero bytes": (b"", "unsupported_format"),
        "gif": (_gif(), "unsupported_format"),
        "text named png": (b"hello, I am not a picture" * 100, "unsupported_format"),
    }
    for name, (data, code) in cases.items():
        reply = await asyncio.to_thread(client.post, "/v1/jobs", json=order(stack.shop.publish(data), f"hostile-{len(name)}"))
        assert reply.status_code == 422, name
        assert reply.json()["error"]["code"] == code, name
    admin = httpx.get(f"{stack.api.url}/v1/admin/jobs", headers={"Authorization": "Bearer test-admin-key"})
    assert admin.json()["jobs"] == []
    assert not (stack.settings.storage_dir / "jobs").exists()


def _gif() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (10, 10)).save(out, "GIF")
    return out.getvalue()
